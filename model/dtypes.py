"""The dtypes a model runs in, by name, for the engine config, the loader and the CLI. The names need no torch (the
CLI offers them without importing it); `resolve_dtype` turns one into a torch dtype."""

AUTO = "auto"  # bfloat16 on a GPU, float32 on the CPU (where bf16 matmuls are slow and fp32 is exact)
DTYPE_NAMES = {  # accepted name: torch attribute
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16",
    "float32": "float32", "fp32": "float32", "float": "float32",
}


def check_dtype_name(name: str) -> None:
    if name != AUTO and name not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {name!r}; use {AUTO}, {', '.join(DTYPE_NAMES)}")


def resolve_dtype(dtype, device):
    """A torch dtype from a name (or "auto" for `device`), or a floating-point torch dtype passed through."""
    import torch  # here, so that the names above import without torch

    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"model dtype must be floating point, got {dtype}")
        return dtype
    check_dtype_name(dtype)
    if dtype == AUTO:
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return getattr(torch, DTYPE_NAMES[dtype])

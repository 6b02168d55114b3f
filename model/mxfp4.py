"""MXFP4 checkpoints (gpt-oss as OpenAI publishes it): expert weights dequantised at load.

Format (OCP Microscaling spec; transformers' integrations/mxfp4.py reads the same files): a weight `X` [E, R, C]
(R output rows, C input columns; gpt-oss's gate_up_proj rows interleave gate and up) is stored as
- `X_blocks` uint8 [E, R, C/32, 16]: 32 FP4 (e2m1) codes per block, two per byte, element 2i in the low nibble and
  element 2i+1 in the high nibble;
- `X_scales` uint8 [E, R, C/32]: one e8m0 scale per block, 2^(s - 127); 255 is NaN.
An e2m1 code is sign (bit 3), exponent (bits 2-1, bias 1) and mantissa (bit 0): magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6.
Every MXFP4 value is exact in bfloat16 (3 significant bits, exponents within bf16's range).

`Mxfp4Checkpoint` wraps a SafetensorsCheckpoint and shows each `X_blocks` + `X_scales` pair as one virtual bf16
tensor `X` in the layout transformers holds gpt-oss experts in ([E, C, R]: the bf16 checkpoints' layout), so the
family's layout conversion (model/weight_map.py) takes both kinds of checkpoint. Errors name the tensor and file.
"""

import torch

from model.checkpoint import CheckpointError, SafetensorsCheckpoint, TensorInfo

BLOCKS_SUFFIX, SCALES_SUFFIX = "_blocks", "_scales"
MXFP4_BLOCK = 32  # elements per scale
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
E8M0_NAN = 255


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """blocks [..., G, 16] uint8, scales [..., G] uint8 -> values [..., G * 32] in `dtype` (exact in bf16/f32)."""
    table = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=blocks.device)
    codes = torch.stack((blocks & 0x0F, blocks >> 4), dim=-1).reshape(*blocks.shape[:-1], 2 * blocks.shape[-1])
    values = torch.ldexp(table[codes.long()], scales.to(torch.int32).unsqueeze(-1) - 127)  # [..., G, 32]
    return values.reshape(*blocks.shape[:-2], -1).to(dtype)


def _dequantize_stored(key: str, blocks: torch.Tensor, scales: torch.Tensor, file, dtype, device) -> torch.Tensor:
    if (scales == E8M0_NAN).any():
        raise CheckpointError(f"tensor {key + SCALES_SUFFIX!r} in {file} holds the e8m0 NaN scale (255)")
    blocks, scales = blocks.to(device), scales.to(device)  # a quarter of the bf16 bytes cross to the device
    out = torch.empty(*blocks.shape[:-2], blocks.shape[-2] * MXFP4_BLOCK, dtype=dtype, device=device)  # [E, R, C]
    for e in range(blocks.shape[0]):  # one expert at a time bounds the int64 code tensor's memory
        out[e] = dequantize_mxfp4(blocks[e], scales[e], dtype)
    return out.transpose(-1, -2)  # [E, C, R], a view


class Mxfp4Checkpoint:
    """A SafetensorsCheckpoint whose MXFP4 pairs read as dequantised `dtype` tensors (see the module docstring),
    dequantised on `device` (the model's: the packed bytes are what is copied there)."""

    def __init__(self, checkpoint: SafetensorsCheckpoint, dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | str = "cpu"):
        self.inner = checkpoint
        self.directory = checkpoint.directory
        self.dtype = dtype
        self.device = torch.device(device)
        self.tensors: dict[str, TensorInfo] = {}
        self.pairs: dict[str, tuple[str, str]] = {}  # virtual key -> (blocks key, scales key)
        for key, info in checkpoint.tensors.items():
            if key.endswith(SCALES_SUFFIX) and key[: -len(SCALES_SUFFIX)] + BLOCKS_SUFFIX in checkpoint.tensors:
                continue
            if not key.endswith(BLOCKS_SUFFIX):
                self.tensors[key] = info
                continue
            base = key[: -len(BLOCKS_SUFFIX)]
            if base in checkpoint.tensors:  # two values for one weight, as a tensor stored in two shards
                raise CheckpointError(f"tensor {base!r} is stored both plain (in {checkpoint.tensors[base].file}) "
                                      f"and as MXFP4 {key!r} (in {info.file})")
            scales = checkpoint.tensors.get(base + SCALES_SUFFIX)
            if scales is None:
                raise CheckpointError(f"tensor {key!r} in {info.file} has no {base + SCALES_SUFFIX!r} (its e8m0 "
                                      f"scales, one per {MXFP4_BLOCK} values)")
            if info.dtype != "U8" or scales.dtype != "U8":
                raise CheckpointError(f"MXFP4 tensors {key!r} ({info.dtype}) and {base + SCALES_SUFFIX!r} "
                                      f"({scales.dtype}) in {info.file} must both be U8")
            if len(info.shape) != 4 or info.shape[-1] != MXFP4_BLOCK // 2 or info.shape[:-1] != scales.shape:
                raise CheckpointError(f"MXFP4 tensor {key!r} in {info.file} has shape {list(info.shape)} and its "
                                      f"scales {list(scales.shape)}: expected [E, rows, groups, 16] and "
                                      f"[E, rows, groups]")
            experts, rows, groups, _ = info.shape
            name = self.dtype_name(dtype)
            self.tensors[base] = TensorInfo(info.file, (experts, groups * MXFP4_BLOCK, rows), name)
            self.pairs[base] = (key, base + SCALES_SUFFIX)

    @staticmethod
    def dtype_name(dtype: torch.dtype) -> str:
        return {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}[dtype]

    def read(self, keys: list[str]):
        """Yield (key, tensor) for `keys`; an MXFP4 key yields its dequantised [E, C, R] tensor."""
        plain = [k for k in keys if k not in self.pairs]
        yield from self.inner.read(plain)
        for key in keys:
            if key in self.pairs:
                blocks_key, scales_key = self.pairs[key]
                stored = dict(self.inner.read([blocks_key, scales_key]))
                yield key, _dequantize_stored(key, stored[blocks_key], stored[scales_key],
                                              self.inner.tensors[blocks_key].file, self.dtype, self.device)

    def read_slices(self, requests):
        raise CheckpointError(f"{self.directory}: MXFP4 checkpoints are loaded whole (no sharded reads)")

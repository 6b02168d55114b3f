"""Quantisation settings: the `quantization_config` of a checkpoint's config.json and the `--quantization` choice.

Two checkpoint formats are read. MXFP4 as OpenAI publishes gpt-oss (`{quant_method: "mxfp4"}`: experts stored as
`*_blocks` + `*_scales`, model/mxfp4.py) is dequantised to the model's dtype at load. Block FP8 is served as stored,
as DeepSeek-V3, Qwen3-FP8 and GLM-4.5-FP8 publish it (DESIGN.md §7):
`{quant_method: "fp8", fmt: "e4m3", activation_scheme: "dynamic", weight_block_size: [128, 128]}`, each quantised
linear stored as `weight` (float8_e4m3fn) + `weight_scale_inv` (float32 per 128x128 block). Anything else in that
object is refused here, naming the field, before a weight is read. The names need no torch (the CLI offers them).
"""

from dataclasses import dataclass

from model.config import ConfigError

QUANTIZATIONS = ("none", "fp8")  # --quantization: none keeps the checkpoint's precision; fp8 quantises at load
FP8_BLOCK = (128, 128)  # the only weight block our kernels take (model/kernels/fp8.py)


class QuantConfigError(ConfigError):
    """A quantization_config we cannot serve; the message names the field."""


@dataclass(frozen=True)
class Fp8CheckpointConfig:
    """What a block-FP8 checkpoint declares. `modules_to_not_convert` are HF module names (or prefixes) kept in
    high precision; the tensors' dtypes in the checkpoint must agree with it."""

    modules_to_not_convert: tuple[str, ...] = ()

    def keeps_high_precision(self, module: str) -> bool:
        """Whether the HF module `module` (e.g. "model.layers.0.mlp.gate") is listed, by itself or a prefix, or by
        its last components (DeepSeek lists "lm_head")."""
        for entry in self.modules_to_not_convert:
            entry = entry.rstrip(".")
            if module == entry or module.startswith(entry + ".") or module.endswith("." + entry):
                return True
        return False


@dataclass(frozen=True)
class Mxfp4CheckpointConfig:
    """An MXFP4 checkpoint (gpt-oss): its experts are dequantised at load (model/mxfp4.py), so the model runs in
    high precision; the modules it lists as not converted are stored that way anyway."""

    modules_to_not_convert: tuple[str, ...] = ()


def check_quantization(name: str) -> None:
    if name not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {name!r}; use {' or '.join(QUANTIZATIONS)}")


def _module_list(d: dict) -> tuple[str, ...]:
    skipped = d.get("modules_to_not_convert") or d.get("ignored_layers") or []
    if not isinstance(skipped, list) or not all(isinstance(m, str) for m in skipped):
        raise QuantConfigError(f"quantization_config.modules_to_not_convert must be a list of module names, got "
                               f"{skipped!r}")
    return tuple(skipped)


def parse_quantization_config(d) -> Fp8CheckpointConfig | Mxfp4CheckpointConfig | None:
    """config.json's `quantization_config` (None when absent) -> Fp8CheckpointConfig / Mxfp4CheckpointConfig, or
    QuantConfigError."""
    if d is None:
        return None
    if not isinstance(d, dict):
        raise QuantConfigError(f"quantization_config must be an object, got {type(d).__name__}")
    method = d.get("quant_method")
    if method == "mxfp4":
        return Mxfp4CheckpointConfig(modules_to_not_convert=_module_list(d))
    if method != "fp8":
        raise QuantConfigError(f"quantization_config.quant_method={method!r} is not supported (\"fp8\": block FP8 as "
                               f"DeepSeek-V3 / Qwen3-FP8 checkpoints store it; \"mxfp4\": gpt-oss)")
    fmt = d.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise QuantConfigError(f"quantization_config.fmt={fmt!r} is not supported (only \"e4m3\")")
    scheme = d.get("activation_scheme", "dynamic")
    if scheme != "dynamic":
        raise QuantConfigError(f"quantization_config.activation_scheme={scheme!r} is not supported (only \"dynamic\": "
                               f"activations are quantised per token and 128 columns at run time)")
    block = d.get("weight_block_size")
    if not isinstance(block, list) or block != list(FP8_BLOCK):  # 128 alone names no field through list(128)
        raise QuantConfigError(f"quantization_config.weight_block_size={block!r} is not supported (only "
                               f"{list(FP8_BLOCK)}: per-tensor or per-channel FP8 checkpoints are not served)")
    return Fp8CheckpointConfig(modules_to_not_convert=_module_list(d))

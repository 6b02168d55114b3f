"""Quantisation settings: the `quantization_config` of a checkpoint's config.json and the `--quantization` choice.

Two checkpoint formats are read. MXFP4 as OpenAI publishes gpt-oss (`{quant_method: "mxfp4"}`: experts stored as
`*_blocks` + `*_scales`, model/mxfp4.py) is dequantised to the model's dtype at load. Block FP8 is served as stored,
as DeepSeek-V3, Qwen3-FP8 and GLM-4.5-FP8 publish it (DESIGN.md §7):
`{quant_method: "fp8", fmt: "e4m3", activation_scheme: "dynamic", weight_block_size: [128, 128]}`, each quantised
linear stored as `weight` (float8_e4m3fn) + `weight_scale_inv` (float32 per 128x128 block). Anything else in that
object is refused here, naming the field, before a weight is read. The names need no torch (the CLI offers them).

The modules a block-FP8 checkpoint keeps in high precision come as `modules_to_not_convert` (transformers' name;
Qwen3-FP8) or `ignored_layers` (vLLM's; AutoFP8): both are read. Three forms of entry occur in published configs
and are taken as their readers take them: a dotted module name, matched whole or by whole leading / trailing
components ("lm_head", "model.layers.0.mlp.gate", "mlp.gate"); a `*` wildcard, as ModelOpt's exclude_modules and
gpt-oss write them ("model.layers.*.self_attn"); "re:" + a regular expression matched from the start of the name, as
compressed-tensors and llm-compressor write them ("re:.*mlp.gate$"). Anything else (a bare regular expression,
which vLLM would compare literally and transformers would search as a pattern) is refused, naming the entry.
"""

import re
from dataclasses import dataclass, field

from model.config import ConfigError

QUANTIZATIONS = ("none", "fp8")  # --quantization: none keeps the checkpoint's precision; fp8 quantises at load
FP8_BLOCK = (128, 128)  # the only weight block our kernels take (model/kernels/fp8.py)


class QuantConfigError(ConfigError):
    """A quantization_config we cannot serve; the message names the field."""


REGEX_PREFIX = "re:"  # compressed-tensors' marker of a regular expression among module names
_NAME = re.compile(r"[A-Za-z0-9_*]+(?:\.[A-Za-z0-9_*]+)*")  # dotted components, `*` wildcards


def _entry_matchers(entry: str, where: str = "modules_to_not_convert") -> tuple[re.Pattern, ...]:
    """The patterns an entry of modules_to_not_convert / ignored_layers names a module by (a match of any of them,
    `re.match` for "re:" entries, `re.fullmatch` for the others), or QuantConfigError naming the entry."""
    if entry.startswith(REGEX_PREFIX):
        try:
            pattern = re.compile(entry[len(REGEX_PREFIX):])
        except re.error as err:
            raise QuantConfigError(f"quantization_config.{where} entry {entry!r} is not a valid regular expression: "
                                   f"{err}") from err
        if pattern.pattern == "":
            raise QuantConfigError(f"quantization_config.{where} entry {entry!r} is an empty regular expression")
        return (pattern,)
    name = entry[:-1] if entry.endswith(".") else entry  # "model.layers.1." names the children of layer 1
    if not _NAME.fullmatch(name):
        raise QuantConfigError(
            f"quantization_config.{where} entry {entry!r} is neither a module name (dotted, e.g. \"mlp.gate\"), a "
            f"\"*\" wildcard (\"model.layers.*.mlp.gate\") nor \"re:\" + a regular expression (\"re:.*mlp\\.gate$\"): a "
            f"bare pattern is read literally by vLLM and as a regular expression by transformers")
    body = re.escape(name).replace(r"\*", ".*")
    # the module itself or one of its parents ("model.layers.1"), or its trailing components ("mlp.gate")
    return re.compile(rf"{body}(?:\..*)?"), re.compile(rf"(?:.*\.)?{body}")


@dataclass(frozen=True)
class Fp8CheckpointConfig:
    """What a block-FP8 checkpoint declares. `modules_to_not_convert` (module docstring: names, wildcards, "re:"
    expressions) are the HF modules kept in high precision; the tensors' dtypes in the checkpoint must agree."""

    modules_to_not_convert: tuple[str, ...] = ()
    _matchers: tuple = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "_matchers", tuple(_entry_matchers(e) for e in self.modules_to_not_convert))

    def keeps_high_precision(self, module: str) -> bool:
        """Whether the HF module `module` (e.g. "model.layers.0.mlp.gate") is listed: by its name, a parent's, its
        last components ("lm_head", "mlp.gate"), a wildcard or a regular expression.
        Components are whole: "model.layers.1" is no parent of model.layers.10, "gate" names no gate_proj."""
        for entry, matchers in zip(self.modules_to_not_convert, self._matchers):
            if entry.startswith(REGEX_PREFIX):
                if matchers[0].match(module):
                    return True
            elif any(m.fullmatch(module) for m in matchers):
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


def _module_list(d: dict, check_entries: bool = False) -> tuple[str, ...]:
    """The high-precision modules a quantization_config lists: `modules_to_not_convert` (transformers' name) and
    `ignored_layers` (vLLM's, which reads it first; transformers takes it as an alias), both when both are given: a
    module either names stays high precision for one of those readers."""
    entries = []
    for where in ("modules_to_not_convert", "ignored_layers"):
        listed = d.get(where)
        if listed is None:
            continue
        if not isinstance(listed, list) or not all(isinstance(m, str) for m in listed):
            raise QuantConfigError(f"quantization_config.{where} must be a list of module names, got {listed!r}")
        if check_entries:
            for entry in listed:
                _entry_matchers(entry, where)
        entries += listed
    return tuple(dict.fromkeys(entries))


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
    return Fp8CheckpointConfig(modules_to_not_convert=_module_list(d, check_entries=True))

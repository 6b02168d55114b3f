"""`load_model(source)`: a checkpoint directory or a preset name → (model ready for inference, tokenizer).

A checkpoint directory holds config.json, *.safetensors (sharded with model.safetensors.index.json, or one file)
and the tokenizer files. Nothing is executed from it (no remote code, no pickle). Every problem is found before
weights are copied and raised as an error naming the file and key.

FP8 (a block-FP8 checkpoint, or `quantization="fp8"`): the plain model is built on the meta device, the FP8
transform (model/quantization.py) swaps in FP8 modules, and only then is memory allocated on `device`; FP8 weights
are copied as stored, high-precision ones assembled per parameter and quantised as they arrive. So the device never
holds a high-precision copy of the model: its peak at load is the FP8 model plus one parameter in high precision
(the largest: one layer's experts) when quantising, the FP8 model alone for an FP8 checkpoint. MLA's kv_b_proj is
the exception on both paths: it stays in high precision (model/quantization.py ALWAYS_HIGH_PRECISION), dequantised
from an FP8 checkpoint as it is read (model/fp8_dequantized.py).
"""

import contextlib
import json
import logging
from pathlib import Path

import torch

from model.byte_tokenizer import ByteTokenizer
from model.checkpoint import CheckpointError, SafetensorsCheckpoint
from model.config import ConfigError, ModelConfig, token_ids
from model.decoder import MoeCausalLM
from model.dtypes import resolve_dtype
from model.families import FAMILIES, config_from_hf
from model.fp8_checkpoint import fp8_targets
from model.fp8_dequantized import dequantize_at_load
from model.kernels.fp8 import FP8_DTYPE
from model.kernels.fp8_linear import block_scaled_mm_supported
from model.layers.rotary import RotaryEmbedding
from model.presets import PRESETS, TINY
from model.mxfp4 import Mxfp4Checkpoint
from model.quant_config import Fp8CheckpointConfig, Mxfp4CheckpointConfig, check_quantization
from model.quantization import apply_fp8, online_targets, quantize_parameter, weight_of_scale
from model.tokenizer import Tokenizer, load_tokenizer
from model.weight_map import QuantizeAtLoad, load_weights, logical_shape, untie_distinct_head, unused_keys

logger = logging.getLogger(__name__)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(f"unreadable {path}: {err}") from err


def read_config(directory: Path) -> ModelConfig:
    """config.json, with generation_config.json's EOS ids added; an error names the file at fault."""
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"no config.json in {directory}")
    try:
        config = config_from_hf(_read_json(config_path), name=directory.name)
    except ConfigError as err:
        raise ConfigError(f"{config_path}: {err}") from err
    if (gen_path := directory / "generation_config.json").is_file():
        generation = _read_json(gen_path)
        try:
            if not isinstance(generation, dict):
                raise ConfigError(f"must hold a JSON object, got {type(generation).__name__}")
            eos = dict.fromkeys(config.eos_token_ids + token_ids(generation.get("eos_token_id")))
            config = config.replace(eos_token_ids=tuple(eos))  # checked against vocab_size again
        except ConfigError as err:
            raise ConfigError(f"{gen_path}: {err}") from err
    return config


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_model(config: ModelConfig, dtype: torch.dtype, device: torch.device | str) -> MoeCausalLM:
    """The model with uninitialised parameters allocated directly on `device` in `dtype` (no float32 detour, so a
    60 GB bf16 model needs 60 GB). Buffers (rotary tables, expert counters) carry explicit dtypes."""
    with torch.device(device), _default_dtype(dtype):
        model = MoeCausalLM(config)
    return model.eval().requires_grad_(False)


def materialize(model: MoeCausalLM, device: torch.device | str) -> MoeCausalLM:
    """A model built on the meta device (and maybe transformed) gets uninitialised memory on `device`; its buffers
    (rotary tables, expert counters), which to_empty leaves as garbage, are made again."""
    known = {"cos_cache", "sin_cache", "expert_load"}
    unknown = {name.rsplit(".", 1)[-1] for name, _ in model.named_buffers()} - known
    if unknown:
        raise AssertionError(f"buffers {sorted(unknown)} would be left uninitialised by to_empty")
    model.to_empty(device=device)
    config = model.config
    with torch.device(device):
        model.model.rotary_emb = RotaryEmbedding.from_config(config)
    for block in model.moe_blocks():
        block.experts.expert_load.zero_()
    return model.eval().requires_grad_(False)


def _high_precision_dtype(model: MoeCausalLM) -> torch.dtype:
    return model.model.embed_tokens.weight.dtype


@torch.no_grad()
def init_random_weights(model: MoeCausalLM, seed: int = 0) -> None:
    """As HF initialises: normal(0, initializer_range) matrices, norm scales 1, biases 0. Drawn on the parameter's
    device (a 30B-parameter model fills in seconds) from a generator seeded per parameter. An FP8 parameter gets the
    high-precision draw of the plain model's parameter of that name, quantised (scales are not drawn), so an FP8
    preset is exactly the quantised bf16 preset."""
    std = model.config.initializer_range
    plain = [(n, p) for n, p in model.named_parameters() if weight_of_scale(n) is None]  # the plain model's order
    for index, (name, param) in enumerate(plain):
        if param.device.type == "meta":  # shape-only model (size estimates, tests): nothing to fill
            continue
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        elif name.endswith(".bias"):
            param.zero_()
        else:
            generator = torch.Generator(device=param.device).manual_seed(seed * 100_003 + index)
            if param.dtype == FP8_DTYPE:
                value = torch.empty(logical_shape(model, name, param), dtype=_high_precision_dtype(model),
                                    device=param.device)
                quantize_parameter(model, name, value.normal_(0.0, std, generator=generator))
            else:
                param.normal_(0.0, std, generator=generator)


def load_model(
    source: str,
    *,
    random_weights: bool = False,
    dtype: torch.dtype | str = torch.bfloat16,
    device: torch.device | str = "cpu",
    seed: int = 0,
    quantization: str = "none",
) -> tuple[MoeCausalLM, Tokenizer]:
    """`source` is a checkpoint directory or a preset (model/presets.py). Presets other than `tiny` have no weights,
    so they need `random_weights=True`; `tiny` is always random (seeded). A directory with `random_weights=True`
    takes only its config (and tokenizer, if any). A block-FP8 checkpoint is served in FP8 as stored;
    `quantization="fp8"` quantises a high-precision checkpoint or a preset at load (model/quantization.py)."""
    check_quantization(quantization)
    dtype = resolve_dtype(dtype, device)
    config, tokenizer, directory, random_weights = resolve_source(source, random_weights)
    checkpoint = None if random_weights else SafetensorsCheckpoint(directory)
    if checkpoint is not None and isinstance(config.quantization, Mxfp4CheckpointConfig):
        checkpoint = Mxfp4Checkpoint(checkpoint, torch.float32 if dtype == torch.float32 else torch.bfloat16,
                                     "cpu" if str(device) == "meta" else device)
    renames = FAMILIES[config.model_type].checkpoint_renames
    config = untie_distinct_head(config, checkpoint, renames)
    ignorable = unused_keys(config, checkpoint, renames)
    if config.mtp_layers and checkpoint is not None:
        logger.info("%s: skipping the %d multi-token-prediction layer(s) after layer %d (%d tensors): not used for "
                    "decoding", directory, config.mtp_layers, config.num_layers - 1,
                    len(ignorable - {"lm_head.weight"}))
    with torch.device("meta"):
        plain = MoeCausalLM(config)
    stored = fp8_targets(plain, checkpoint, renames, ignorable) if checkpoint is not None else []
    if checkpoint is not None:  # FP8 weights served in high precision (MLA's kv_b_proj): dequantised as read
        checkpoint = dequantize_at_load(plain, checkpoint, renames)
    if quantization == "fp8" or (checkpoint is None and isinstance(config.quantization, Fp8CheckpointConfig)):
        targets = stored or online_targets(plain)  # an FP8 checkpoint stays as stored; anything else is quantised
    else:
        targets = stored
    if not targets:
        model = build_model(config, dtype, device)
        if checkpoint is None:
            init_random_weights(model, seed)
        else:
            load_weights(model, checkpoint, renames, ignorable)
        return model, tokenizer
    if dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"FP8 weights run with bfloat16 activations (float32 on the CPU), not {dtype}")
    model = materialize(apply_fp8(build_model(config, dtype, "meta"), targets), device)
    if checkpoint is None:
        init_random_weights(model, seed)
    elif stored:
        load_weights(model, checkpoint, renames, ignorable)
    else:
        fp8 = {n for n, p in model.named_parameters() if p.dtype == FP8_DTYPE}
        quantize = QuantizeAtLoad(fp8, dtype, lambda name, value: quantize_parameter(model, name, value))
        load_weights(model, checkpoint, renames, ignorable, quantize)
    weight_device = next(model.parameters()).device
    if weight_device.type == "cuda":  # decided now, never inside a CUDA-graph capture
        block_scaled_mm_supported(weight_device)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    logger.info("FP8 (%s): %d modules in float8_e4m3fn with 128x128 block scales, weights %.2f GiB",
                "as stored in the checkpoint" if stored else "quantised at load", len(targets), size / 2**30)
    return model, tokenizer


def resolve_source(source: str, random_weights: bool) -> tuple[ModelConfig, Tokenizer, Path, bool]:
    """(config, tokenizer, directory, random_weights) of a `load_model` source, checked, before any weight exists
    (also used by model/parallel, which builds a rank's shard instead of the whole model). Presets always come
    back with random_weights=True."""
    directory = Path(source)
    if source in PRESETS and not directory.is_dir():
        if source != TINY and not random_weights:
            raise ValueError(f"preset {source!r} has no weights: pass random_weights=True (--random-weights)")
        config = config_from_hf(PRESETS[source], name=source)
        tokenizer = ByteTokenizer(name=source, extra_eos_token_ids=config.eos_token_ids)
        random_weights = True
    elif directory.is_dir():
        config = read_config(directory)
        if random_weights and not (directory / "tokenizer.json").is_file():
            tokenizer = ByteTokenizer(name=config.name, extra_eos_token_ids=config.eos_token_ids)
            if tokenizer.vocab_size > config.vocab_size:
                raise CheckpointError(f"the byte tokenizer's {tokenizer.vocab_size} tokens exceed the vocab_size "
                                      f"{config.vocab_size} of {directory / 'config.json'}")
        else:
            tokenizer = load_tokenizer(directory, config.name, extra_eos_token_ids=config.eos_token_ids)
            tokenizer.check_fits(config.vocab_size)
    else:
        raise FileNotFoundError(f"{source!r} is neither a checkpoint directory nor a preset "
                                f"({', '.join(PRESETS)})")
    return config, tokenizer, directory, random_weights

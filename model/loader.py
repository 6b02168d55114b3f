"""`load_model(source)`: a checkpoint directory or a preset name → (model ready for inference, tokenizer).

A checkpoint directory holds config.json, *.safetensors (sharded with model.safetensors.index.json, or one file)
and the tokenizer files. Nothing is executed from it (no remote code, no pickle). Every problem is found before
weights are copied and raised as an error naming the file and key.
"""

import contextlib
import json
from pathlib import Path

import torch

from model.byte_tokenizer import ByteTokenizer
from model.checkpoint import CheckpointError, SafetensorsCheckpoint
from model.config import ConfigError, ModelConfig
from model.decoder import MoeCausalLM
from model.dtypes import resolve_dtype
from model.families import FAMILIES, config_from_hf
from model.presets import PRESETS, TINY
from model.tokenizer import Tokenizer, load_tokenizer
from model.weight_map import load_weights


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(f"unreadable {path}: {err}") from err


def read_config(directory: Path) -> ModelConfig:
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"no config.json in {directory}")
    extra_eos = ()
    if (gen_path := directory / "generation_config.json").is_file():
        eos = _read_json(gen_path).get("eos_token_id")
        extra_eos = eos if isinstance(eos, list) else ([eos] if isinstance(eos, int) else [])
    try:
        return config_from_hf(_read_json(config_path), name=directory.name, extra_eos_token_ids=extra_eos)
    except ConfigError as err:
        raise ConfigError(f"{config_path}: {err}") from err


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


@torch.no_grad()
def init_random_weights(model: MoeCausalLM, seed: int = 0) -> None:
    """As HF initialises: normal(0, initializer_range) matrices, norm scales 1, biases 0. Drawn on the parameter's
    device (a 30B-parameter model fills in seconds) from a generator seeded per parameter."""
    std = model.config.initializer_range
    for index, (name, param) in enumerate(model.named_parameters()):
        if param.device.type == "meta":  # shape-only model (size estimates, tests): nothing to fill
            continue
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        elif name.endswith(".bias"):
            param.zero_()
        else:
            generator = torch.Generator(device=param.device).manual_seed(seed * 100_003 + index)
            param.normal_(0.0, std, generator=generator)


def load_model(
    source: str,
    *,
    random_weights: bool = False,
    dtype: torch.dtype | str = torch.bfloat16,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> tuple[MoeCausalLM, Tokenizer]:
    """`source` is a checkpoint directory or a preset (`tiny`, `qwen3-30b-a3b`, `olmoe-1b-7b`, `mixtral-8x7b`,
    `qwen2-moe-a2.7b`). Presets other than `tiny` have no weights, so they need `random_weights=True`; `tiny` is
    always random (seeded). A directory with `random_weights=True` takes only its config (and tokenizer, if any)."""
    dtype = resolve_dtype(dtype, device)
    config, tokenizer, directory, random_weights = resolve_source(source, random_weights)
    model = build_model(config, dtype, device)
    if random_weights:
        init_random_weights(model, seed)
    else:
        ignorable = {"lm_head.weight"} if config.tie_word_embeddings else set()
        renames = FAMILIES[config.model_type].checkpoint_renames
        load_weights(model, SafetensorsCheckpoint(directory), renames, ignorable)
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
        else:
            tokenizer = load_tokenizer(directory, config.name, extra_eos_token_ids=config.eos_token_ids)
        if tokenizer.vocab_size > config.vocab_size:
            raise CheckpointError(f"tokenizer in {directory} has {tokenizer.vocab_size} tokens, more than the "
                                  f"model's vocab_size {config.vocab_size}")
    else:
        raise FileNotFoundError(f"{source!r} is neither a checkpoint directory nor a preset "
                                f"({', '.join(PRESETS)})")
    return config, tokenizer, directory, random_weights

"""Prompts for the load generator: token-exact random prompts, or the first exchange of ShareGPT conversations.

Random prompts are lists of token ids sent as such to /v1/completions (our server and vLLM take token-id prompts),
so a prompt is exactly `input_len` tokens with no detokenize/re-tokenize drift. Outputs are made exactly
`output_len` tokens by sending `ignore_eos` (a vLLM extension our server also accepts) with `max_tokens`.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

# vLLM's ShareGPT filter: drop very short exchanges and ones that would not fit a 2k context
SHAREGPT_MIN_TOKENS = 4
SHAREGPT_MAX_PROMPT_TOKENS = 1024
SHAREGPT_MAX_TOTAL_TOKENS = 2048


@dataclass(frozen=True)
class PromptSpec:
    prompt: list[int] | str   # token ids (exact) or text (the server tokenizes it)
    prompt_len: int           # tokens: exact for ids, counted with the model's tokenizer for text
    output_len: int           # max_tokens, generated in full (ignore_eos)


def random_token_prompts(num: int, input_len: int, output_len: int, vocab_size: int, seed: int = 0) -> list[PromptSpec]:
    """`num` prompts of `input_len` ids drawn uniformly from [0, vocab_size)."""
    if num < 1 or input_len < 1 or output_len < 1:
        raise ValueError(f"num, input_len and output_len must be >= 1, got {num}, {input_len}, {output_len}")
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    rng = random.Random(seed)
    return [PromptSpec([rng.randrange(vocab_size) for _ in range(input_len)], input_len, output_len)
            for _ in range(num)]


def token_prompts(prompts: list[list[int]], output_len: int) -> list[PromptSpec]:
    """Given token-id prompts (e.g. the exact batch an offline baseline runs on)."""
    return [PromptSpec(list(p), len(p), output_len) for p in prompts]


def load_sharegpt(path: str | Path, num: int, tokenizer, seed: int = 0,
                  fixed_output_len: int | None = None) -> list[PromptSpec]:
    """ShareGPT JSON: a list of {"conversations": [{"from": "human", "value": ...}, {"from": "gpt", ...}, ...]}.
    Prompt = the first turn, output length = the second turn's token count (or `fixed_output_len`)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as err:
        raise ValueError(f"cannot read the ShareGPT file {path}: {err}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: a ShareGPT file is a JSON list of conversations, got {type(data).__name__}")
    exchanges = []
    for entry in data:
        turns = entry.get("conversations", entry.get("conversation")) if isinstance(entry, dict) else None
        if not isinstance(turns, list) or len(turns) < 2:
            continue
        prompt, reply = (t.get("value") if isinstance(t, dict) else None for t in turns[:2])
        if isinstance(prompt, str) and isinstance(reply, str):
            exchanges.append((prompt, reply))
    random.Random(seed).shuffle(exchanges)
    specs = []
    for prompt, reply in exchanges:
        prompt_len = len(tokenizer.encode(prompt))
        output_len = fixed_output_len or len(tokenizer.encode(reply))
        if prompt_len < SHAREGPT_MIN_TOKENS or output_len < SHAREGPT_MIN_TOKENS:
            continue
        if prompt_len > SHAREGPT_MAX_PROMPT_TOKENS or prompt_len + output_len > SHAREGPT_MAX_TOTAL_TOKENS:
            continue
        specs.append(PromptSpec(prompt, prompt_len, output_len))
        if len(specs) == num:
            break
    if not specs:
        raise ValueError(f"{path}: no conversation has a usable first exchange (two text turns of "
                         f"{SHAREGPT_MIN_TOKENS}..{SHAREGPT_MAX_PROMPT_TOKENS} prompt tokens)")
    return specs


def tokenizer_for(source: str):
    """The tokenizer a server of `source` uses: a preset's byte tokenizer, or a checkpoint directory's own."""
    from model.byte_tokenizer import ByteTokenizer
    from model.presets import PRESETS
    from model.tokenizer import load_tokenizer

    if Path(source).is_dir():
        if (Path(source) / "tokenizer.json").is_file():
            return load_tokenizer(source)
        return ByteTokenizer(name=source)
    if source in PRESETS:
        return ByteTokenizer(name=source)
    raise ValueError(f"--tokenizer {source!r} is neither a checkpoint directory nor a preset ({', '.join(PRESETS)})")


def model_vocab_size(source: str) -> int:
    """Token ids the model's embedding accepts (what the server validates prompts against)."""
    from model.presets import PRESETS

    if Path(source).is_dir():
        config_path = Path(source) / "config.json"
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot read the vocabulary size from {config_path}: {err}") from None
        vocab = config.get("vocab_size", (config.get("text_config") or {}).get("vocab_size"))
        if not isinstance(vocab, int) or vocab < 1:
            raise ValueError(f"{config_path} has no positive vocab_size")
        return vocab
    if source in PRESETS:
        return int(PRESETS[source]["vocab_size"])
    raise ValueError(f"{source!r} is neither a checkpoint directory nor a preset ({', '.join(PRESETS)}): "
                     f"give --vocab-size or --tokenizer")

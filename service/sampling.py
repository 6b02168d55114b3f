"""A request's fields -> the engine's SamplingParams, one per choice (choice i samples with seed + i).

Text-valued parameters become token ids here, on the tokenizer threads: bad_words (each word as it would be
tokenized inside and at the start of a text, as vLLM) and the grammar of an output constraint.
"""

from __future__ import annotations

from model.engine import SamplingParams
from service.errors import bad_request
from service.protocol import SamplingRequest


def bad_words_token_ids(tokenizer, words: list[str]) -> list[list[int]]:
    """Each word's token ids; also those of the word after a space, when the tokenizer merges the space into the
    word's first token (so the word is banned mid-text as well as at the start)."""
    out = []
    for word in words:
        ids = tokenizer.encode(word.lstrip(), add_special_tokens=False)
        if not ids:
            continue
        out.append(ids)
        spaced = tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
        if len(spaced) == len(ids) and spaced[0] != ids[0]:
            out.append(spaced)
    return out


def check_token_ids(body: SamplingRequest, vocab_size: int) -> None:
    for name, ids in (("logit_bias", list(body.logit_bias_ids())), ("allowed_token_ids", body.allowed_token_ids)):
        bad = next((t for t in ids or [] if t >= vocab_size), None)
        if bad is not None:
            raise bad_request(f"Token id {bad} in {name} is outside the vocabulary (size {vocab_size})", name,
                              "invalid_token_id")


def check_allowed_tokens(body: SamplingRequest, bad_words: list[list[int]], eos_token_ids: list[int]) -> None:
    """400 when allowed_token_ids leaves nothing to sample: every id is a one-token bad word, or (while min_tokens
    holds) a stop token or EOS. Contradictions found only while generating (a grammar's) end the choice with an
    error (finish_reason "error" in the engine)."""
    if body.allowed_token_ids is None:
        return
    banned = {word[0] for word in bad_words if len(word) == 1}
    names = ["bad_words"]
    if body.min_tokens > 0:
        banned |= set(body.stop_token_ids or []) | (set() if body.ignore_eos else set(eos_token_ids))
        names += ["stop_token_ids" if body.stop_token_ids else None, None if body.ignore_eos else "EOS",
                  "min_tokens"]
    if set(body.allowed_token_ids) <= banned:
        because = ", ".join(n for n in names if n)
        raise bad_request(f"Every token in allowed_token_ids is banned (by {because}): nothing could be generated",
                          "allowed_token_ids", "conflicting_constraints")


def sampling_params(body: SamplingRequest, max_tokens: int, *, logprobs: int | None, prompt_logprobs: int | None,
                    bad_words: list[list[int]], grammar=None, ignore_eos: bool | None = None) -> list[SamplingParams]:
    stops = body.stop_strings()
    bias = body.logit_bias_ids()
    params = []
    for i in range(body.n):
        # seed + i as vLLM passes it: past 2**63 - 1 near the int64 limit, where the sampler's 64-bit seed wraps
        # it to the int64 minimum, so the n choices stay distinct (taking it mod 2**63 made choice 1 of seed
        # 2**63 - 1 repeat seed 0)
        seed = None if body.seed is None else body.seed + i
        params.append(SamplingParams(
            max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
            min_p=body.min_p, seed=seed, stop=stops, stop_token_ids=list(body.stop_token_ids or []),
            ignore_eos=body.ignore_eos if ignore_eos is None else ignore_eos,
            min_tokens=min(body.min_tokens, max_tokens), presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty, repetition_penalty=body.repetition_penalty, logit_bias=bias,
            allowed_token_ids=body.allowed_token_ids, bad_words_token_ids=bad_words,
            skip_special_tokens=body.skip_special_tokens, include_stop_str_in_output=body.include_stop_str_in_output,
            logprobs=logprobs, prompt_logprobs=prompt_logprobs, grammar=grammar, cache_salt=body.cache_salt))
    return params


def truncate_prompt(prompt: list[int], keep: int | None, context: int) -> list[int]:
    """truncate_prompt_tokens: the last `keep` tokens (-1: as many as the context holds, leaving one to generate)."""
    if keep is None:
        return prompt
    keep = context - 1 if keep == -1 else keep
    return prompt[-keep:] if len(prompt) > keep else prompt

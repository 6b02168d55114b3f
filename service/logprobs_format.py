"""The engine's TokenLogprobs in the response shapes clients parse: OpenAI completions (`tokens`, `token_logprobs`,
`top_logprobs`, `text_offset`), OpenAI chat (`content: [{token, logprob, bytes, top_logprobs}]`) and vLLM's
`prompt_logprobs` (per prompt token, None for the first, else {token id: {logprob, rank, decoded_token}}).

A token's text is its bytes decoded as UTF-8; a token that is part of a multi-byte character is written
"bytes:\\xNN..." as vLLM does, and `bytes` (chat) always carries the raw bytes. With return_tokens_as_token_ids,
tokens are written "token_id:N". JSON has no -inf: a token no sampling could pick reports -9999.0, as vLLM.
"""

from __future__ import annotations

import codecs
import functools

from model.engine.logprobs import TokenLogprobs

FLOOR = -9999.0


def _finite(value: float) -> float:
    return value if value > FLOOR else FLOOR


def _breaks_off(pending: bytes, raw: bytes) -> bool:
    """Whether `raw` cannot continue the unfinished character `pending` (bytes of earlier tokens): the decoder then
    writes that character's U+FFFD, the earlier tokens' text, before this token's own."""
    if not pending or not raw:
        return False
    strict = codecs.getincrementaldecoder("utf-8")("strict")
    strict.setstate((pending, 0))
    try:
        strict.decode(raw[:1])
    except UnicodeDecodeError:
        return True
    return False


class TokenTexts:
    """Token id -> (text, bytes), cached: the same ids recur in every alternatives list."""

    def __init__(self, tokenizer, as_ids: bool = False):
        self.tokenizer = tokenizer
        self.as_ids = as_ids
        self._bytes = functools.lru_cache(maxsize=65536)(tokenizer.token_bytes)
        self._skipped: dict[int, bool] = {}

    def bytes(self, token_id: int) -> bytes:
        return self._bytes(token_id)

    def skipped(self, token_id: int) -> bool:
        """Whether skip_special_tokens leaves the token out of the text (a special token: it has bytes, its text
        when skipped is empty)."""
        skipped = self._skipped.get(token_id)
        if skipped is None:
            skipped = self._skipped[token_id] = (bool(self._bytes(token_id)) and
                                                 self.tokenizer.decode([token_id], skip_special_tokens=True) == "")
        return skipped

    def text(self, token_id: int) -> str:
        if self.as_ids:
            return f"token_id:{token_id}"
        raw = self._bytes(token_id)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


class CompletionLogprobs:
    """Accumulates the completions shape for one choice; `add` returns the part for new tokens (streaming).
    `text_offset` indexes the choice's text: a special token that skip_special_tokens leaves out adds nothing."""

    def __init__(self, texts: TokenTexts, skip_special_tokens: bool = True, k: int | None = None):
        self.texts = texts
        self.skip_special_tokens = skip_special_tokens
        self.k = k  # alternatives per token: the engine computes the request's largest (prompt_logprobs may ask more)
        self.offset = 0  # characters of the choice's text before the next token
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")  # bytes -> characters, across tokens
        self.value = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

    def add(self, entries: list[TokenLogprobs | None], prompt_ids: list[int] | None = None,
            verbatim: str | None = None) -> dict:
        """Append tokens (prompt tokens with `prompt_ids`: the first has no logprob); returns just this part.
        `verbatim`: the echoed prompt when it is the client's own string, which keeps special-token text the client
        typed (a skipped special token then counts where that text stands at its offset; one the tokenizer added,
        such as BOS, does not)."""
        part = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for i, entry in enumerate(entries):
            token_id = entry.token_id if entry is not None else prompt_ids[i]
            text = self.texts.text(token_id)
            part["tokens"].append(text)
            raw = self.texts.bytes(token_id)
            shown = not (self.skip_special_tokens and self.texts.skipped(token_id)) or (
                verbatim is not None and verbatim.startswith(raw.decode("utf-8", "replace"), self.offset))
            start = self.offset
            if shown:
                start += _breaks_off(self.decoder.getstate()[0], raw)
                self.offset += len(self.decoder.decode(raw))
            part["text_offset"].append(start)
            if entry is None:
                part["token_logprobs"].append(None)
                part["top_logprobs"].append(None)
                continue
            part["token_logprobs"].append(_finite(entry.logprob))
            top = {self.texts.text(t): _finite(v) for t, v in entry.top[:self.k]}
            top.setdefault(text, _finite(entry.logprob))
            part["top_logprobs"].append(top)
        for key, values in part.items():
            self.value[key] += values
        return part


def chat_logprobs(entries: list[TokenLogprobs], texts: TokenTexts) -> list[dict]:
    """OpenAI chat `logprobs.content` items."""
    def item(token_id: int, logprob: float) -> dict:
        return {"token": texts.text(token_id), "logprob": _finite(logprob), "bytes": list(texts.bytes(token_id))}

    return [{**item(e.token_id, e.logprob), "top_logprobs": [item(t, v) for t, v in e.top]} for e in entries]


def prompt_logprobs(entries: list[TokenLogprobs | None], texts: TokenTexts,
                    k: int | None = None) -> list[dict | None]:
    """vLLM's prompt_logprobs: per prompt token None (the first) or {id: {logprob, rank, decoded_token}} holding the
    prompt token and its k best alternatives (entries may carry more: echo with a larger `logprobs`)."""
    out: list[dict | None] = []
    for entry in entries:
        if entry is None:
            out.append(None)
            continue
        d = {str(t): {"logprob": _finite(v), "rank": r + 1, "decoded_token": texts.text(t)}
             for r, (t, v) in enumerate(entry.top[:k])}
        d.setdefault(str(entry.token_id), {"logprob": _finite(entry.logprob), "rank": entry.rank,
                                           "decoded_token": texts.text(entry.token_id)})
        out.append(d)
    return out

"""/v1/completions: prompts (text, token ids, or a batch of either) -> choices, as one JSON body or an SSE stream.

echo prepends each prompt's text (and, with logprobs, its tokens' logprobs: the first has none) to its choices;
echo with max_tokens 0 scores the prompt only (one token is generated and dropped, as vLLM does).
"""

from __future__ import annotations

import bisect

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from service.errors import bad_request
from service.logprobs_format import CompletionLogprobs, TokenTexts, prompt_logprobs
from service.prompts import completion_prompt_ids
from service.protocol import CompletionRequest, new_id, now
from service.sampling import (bad_words_token_ids, check_allowed_tokens, check_token_ids, sampling_params,
                              truncate_prompt)
from service.serving import EventStreamResponse, OpenAIServing, Usage, has_content, stream_chunk
from service.structured_request import compile_constraint, requested_constraint

DEFAULT_MAX_TOKENS = 16


class _Choice:
    def __init__(self, index: int, prompt: list[int], prompt_text: str, verbatim: bool, body: CompletionRequest,
                 texts: TokenTexts):
        self.index = index
        self.prompt = prompt
        self.echo_text = prompt_text if body.echo else ""
        self.verbatim = verbatim  # echo_text is the client's own string, not decoded from the prompt's ids
        self.echo_only = body.echo and body.max_tokens == 0
        self.text = ""
        self.token_ids: list[int] = []
        self.finish_reason = self.stop_reason = None
        self.started = False
        self.logprobs = CompletionLogprobs(texts, body.skip_special_tokens, body.logprobs) \
            if body.logprobs is not None else None
        self.echo_logprobs = body.echo and body.logprobs is not None
        self.prompt_logprobs = None
        self.prompt_k = body.prompt_logprobs
        self.texts = texts
        self.unsent = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}  # rows held back

    def add(self, output) -> tuple[str, dict | None]:
        """Take one engine output; returns (its text, its logprobs part) as a stream chunk shows them."""
        text, part = "", None
        if not self.started:
            self.started = True
            text = self.echo_text
            if output.prompt_logprobs is not None:
                if self.prompt_k is not None:
                    self.prompt_logprobs = prompt_logprobs(output.prompt_logprobs, self.texts, self.prompt_k)
                if self.echo_logprobs:
                    part = self.logprobs.add(output.prompt_logprobs, prompt_ids=self.prompt,
                                             verbatim=self.echo_text if self.verbatim else None)
        if not self.echo_only:
            text += output.new_text
            self.token_ids += output.new_token_ids
            if self.logprobs is not None and output.logprobs:
                new = self.logprobs.add(output.logprobs)
                part = new if part is None else {k: part[k] + new[k] for k in part}
        self.text += text
        if output.finished:
            self.finish_reason = "length" if self.echo_only else output.finish_reason
            self.stop_reason = None if self.echo_only else output.stop_reason
        return text, self._settled(part, output.finished)

    def _settled(self, part: dict | None, finished: bool) -> dict | None:
        """The logprobs rows a stream sends now, so that its offsets are the ones logprobs_value gives. A row whose
        text_offset lies within the text sent so far is final (that text is never taken back); one past it (its
        token's text held back while it may begin a stop string, or end in a partial character) waits: a stop
        string may still cut the text before it. At the finish every row goes, clamped to the text's end."""
        if self.logprobs is None:
            return None
        if part is not None:
            for key, rows in part.items():
                self.unsent[key] += rows
        offsets = self.unsent["text_offset"]
        ready = len(offsets) if finished else bisect.bisect_right(offsets, len(self.text))
        if part is None and not ready:
            return None
        out = {key: rows[:ready] for key, rows in self.unsent.items()}
        self.unsent = {key: rows[ready:] for key, rows in self.unsent.items()}
        out["text_offset"] = [min(o, len(self.text)) for o in out["text_offset"]]
        return out

    def logprobs_value(self) -> dict | None:
        """The whole choice's logprobs; offsets past the text (tokens of a stop string cut from it) are its end."""
        if self.logprobs is None:
            return None
        value = dict(self.logprobs.value)
        value["text_offset"] = [min(o, len(self.text)) for o in value["text_offset"]]
        return value


async def completions(serving: OpenAIServing, body: CompletionRequest, request: Request) -> Response:
    serving.check_request(body)
    constraint = requested_constraint(body)
    texts_in = body.prompts()
    engine = serving.engine_for(len(texts_in), body.n)
    vocab = int(engine.model_config.vocab_size)
    check_token_ids(body, vocab)
    context = engine.max_model_len

    def prepare():
        untruncated = completion_prompt_ids(engine.tokenizer, vocab, texts_in, body.add_special_tokens)
        prompts = [truncate_prompt(p, body.truncate_prompt_tokens, context) for p in untruncated]
        grammar = compile_constraint(constraint, engine) if constraint else None
        bad = bad_words_token_ids(engine.tokenizer, body.bad_words or [])
        verbatim = [isinstance(text, str) and len(ids) == len(full)
                    for text, ids, full in zip(texts_in, prompts, untruncated)]
        echo = [text if same else engine.tokenizer.decode(ids, skip_special_tokens=body.skip_special_tokens)
                for text, ids, same in zip(texts_in, prompts, verbatim)] if body.echo else [""] * len(prompts)
        return prompts, grammar, bad, echo, verbatim

    prompts, grammar, bad_words, echo_texts, verbatim = await serving.off_loop(prepare)
    prompt_lens = [len(p) for p in prompts]
    echo_only = body.echo and body.max_tokens == 0
    requested = 1 if echo_only else body.max_tokens
    max_tokens = serving.resolve_max_tokens(requested, DEFAULT_MAX_TOKENS, prompt_lens, context, "max_tokens")
    if body.min_tokens > (0 if echo_only else max_tokens):
        raise bad_request(f"min_tokens ({body.min_tokens}) exceeds max_tokens ({0 if echo_only else max_tokens})",
                          "min_tokens")
    check_allowed_tokens(body, bad_words, engine.eos_token_ids)
    scored = body.logprobs if body.echo and body.logprobs is not None else None
    prompt_k = max((k for k in (body.prompt_logprobs, scored) if k is not None), default=None)
    params = sampling_params(body, max_tokens, logprobs=body.logprobs, prompt_logprobs=prompt_k,
                             bad_words=bad_words, grammar=grammar, ignore_eos=True if echo_only else None)
    group = await serving.submit(prompts, params)

    texts = TokenTexts(engine.tokenizer, body.return_tokens_as_token_ids)
    choices = [_Choice(i, prompts[i // body.n], echo_texts[i // body.n], verbatim[i // body.n], body, texts)
               for i in range(len(prompts) * body.n)]
    usage = Usage(len(choices), prompt_lens)
    request_id, created = new_id("cmpl", body.request_id), now()

    def chunk(choice_list: list[dict], with_usage: bool = False) -> dict:
        return stream_chunk(body, usage, request_id, "text_completion", created, serving.served_model_name, choice_list,
                            with_usage)

    def extras(choice: _Choice) -> dict:
        out = {}
        if body.prompt_logprobs is not None:
            out["prompt_logprobs"] = choice.prompt_logprobs
        if body.return_token_ids:
            out["prompt_token_ids"] = choice.prompt
            out["token_ids"] = choice.token_ids
        return out

    if body.stream:
        def on_output(index, output):
            choice = choices[index]
            first = not choice.started
            text, part = choice.add(output)
            usage.add(index, output, hidden=1 if echo_only else 0)
            if not has_content(output):
                return []
            item = {"index": index, "text": text, "logprobs": part,
                    "finish_reason": choice.finish_reason if output.finished else None,
                    "stop_reason": choice.stop_reason if output.finished else None}
            if first and body.prompt_logprobs is not None:
                item["prompt_logprobs"] = choice.prompt_logprobs
            if body.return_token_ids:
                item["token_ids"] = [] if echo_only else list(output.new_token_ids)
                if first:
                    item["prompt_token_ids"] = choice.prompt
            return [chunk([item])]

        def final_chunks():
            return [chunk([], with_usage=True)] if body.include_usage_in_stream() else []

        return EventStreamResponse(serving.stream(group, on_output, None, final_chunks))

    def collect(index, output):
        choices[index].add(output)
        usage.add(index, output, hidden=1 if echo_only else 0)

    await serving.collect(group, collect, request)
    return JSONResponse({
        "id": request_id, "object": "text_completion", "created": created, "model": serving.served_model_name,
        "choices": [{"index": c.index, "text": c.text,
                     "logprobs": c.logprobs_value(),
                     "finish_reason": c.finish_reason, "stop_reason": c.stop_reason, **extras(c)}
                    for c in choices],
        "usage": usage.as_dict()})

"""/v1/chat/completions: messages (and tools) through the chat template -> assistant messages, whole or streamed.

Output text goes through the reasoning parser (--reasoning-parser: <think> text, or gpt-oss's analysis channel
(harmony, which keeps the output's special tokens and is handed the text of its stop token, `<|call|>` or
`<|return|>`, which the engine leaves out) -> `reasoning_content`), then the tool-call parser (--tool-call-parser,
when the request has tools and tool_choice is not "none": calls -> `tool_calls`, finish_reason "tool_calls").
tool_choice "required" or a named function constrains the output with the parser's forcing grammar, so a valid call
comes out whatever the weights.
"""

from __future__ import annotations


from fastapi import Request
from fastapi.responses import JSONResponse, Response

from service.errors import bad_request
from service.harmony import BODY_ENDS
from service.logprobs_format import TokenTexts, chat_logprobs, prompt_logprobs
from service.prompts import chat_prompt_ids
from service.protocol import new_id, now
from service.protocol_chat import ChatCompletionRequest, NamedToolChoice
from service.reasoning import get_reasoning_parser, prompt_opens_thinking
from service.sampling import (bad_words_token_ids, check_allowed_tokens, check_token_ids, sampling_params,
                              truncate_prompt)
from service.serving import EventStreamResponse, OpenAIServing, Usage, has_content, stream_chunk
from service.structured_request import compile_constraint, requested_constraint
from service.tool_parsers import get_tool_parser


class _Choice:
    """One choice's state: its text, and for streams the reasoning and tool-call parsers' progress."""

    def __init__(self, index: int, reasoner, starts_in_think: bool, tool_parser, texts: TokenTexts,
                 stop_ids: frozenset[int] = frozenset()):
        self.index = index
        self.stop_ids = stop_ids  # the stop tokens whose text the harmony parser reads (the engine leaves it out)
        self.text = ""
        self.token_ids: list[int] = []
        self.logprobs: list = []
        self.prompt_logprobs = None
        self.finish_reason = self.stop_reason = None
        self.reasoning = reasoner.streamer(starts_in_think) if reasoner else None
        self.tools = tool_parser.streamer() if tool_parser else None
        self.num_calls = 0
        self.texts = texts

    def add(self, output) -> None:
        self.text += output.new_text
        self.token_ids += output.new_token_ids
        if output.logprobs:
            self.logprobs += output.logprobs
        if output.prompt_logprobs is not None:
            self.prompt_logprobs = prompt_logprobs(output.prompt_logprobs, self.texts)
        if output.finished:
            self.finish_reason, self.stop_reason = output.finish_reason, output.stop_reason

    def stop_marker(self) -> str:
        """The harmony marker that stopped the output (a token of `stop_ids` whose text ends a harmony message):
        `<|call|>` and `<|return|>` are gpt-oss's EOS tokens, which the engine leaves out of the text, and the
        harmony parser needs them to tell a finished call from one cut off by max_tokens. "" for any other end."""
        if self.finish_reason != "stop" or not self.token_ids or self.token_ids[-1] not in self.stop_ids:
            return ""
        text = self.texts.tokenizer.decode([self.token_ids[-1]], skip_special_tokens=False)
        return text if text in BODY_ENDS else ""

    def delta(self, output, include_reasoning: bool) -> dict:
        """The stream delta of one output: reasoning_content, content and completed tool_calls."""
        reasoning, content = ("", output.new_text) if self.reasoning is None else self.reasoning.feed(output.new_text)
        if output.finished and self.reasoning is not None:
            r, c = self.reasoning.feed(self.stop_marker())
            reasoning, content = reasoning + r, content + c
            r, c = self.reasoning.finish()
            reasoning, content = reasoning + r, content + c
        calls = []
        if self.tools is not None:
            content, calls = self.tools.feed(content)
            if output.finished:
                c, more = self.tools.finish()
                content, calls = content + c, calls + more
        delta = {}
        if reasoning and include_reasoning:
            delta["reasoning_content"] = reasoning
        if content or (not delta and not calls and output.new_token_ids):
            delta["content"] = content
        if calls:
            delta["tool_calls"] = [call.openai(index=self.num_calls + k) for k, call in enumerate(calls)]
            self.num_calls += len(calls)
        return delta


def _finish_reason(reason: str | None, has_calls: bool, tool_mode: str | None, stream: bool) -> str | None:
    """vLLM's rule (its chat serving): with calls in the output, "stop" becomes "tool_calls" under tool_choice
    auto or required, a named function keeps "stop" (as OpenAI). Non-streamed under auto, vLLM relabels "length"
    too (a complete call parsed before max_tokens cut the text after it); its streams and `required` keep it."""
    if not has_calls or tool_mode not in ("auto", "required"):
        return reason
    if reason == "stop" or (reason == "length" and tool_mode == "auto" and not stream):
        return "tool_calls"
    return reason


async def chat(serving: OpenAIServing, body: ChatCompletionRequest, request: Request) -> Response:
    serving.check_request(body)
    options = serving.options
    constraint = requested_constraint(body)
    tool_parser = None
    if body.tools and body.tool_choice != "none":
        if options.tool_call_parser is None:
            raise bad_request("This server parses no tool calls (start it with --tool-call-parser)", "tools",
                              "unsupported")
        tool_parser = get_tool_parser(options.tool_call_parser)
    named = isinstance(body.tool_choice, NamedToolChoice)
    tool_mode = None if tool_parser is None else "named" if named else body.tool_choice or "auto"
    if tool_parser is not None and (named or body.tool_choice == "required"):
        if constraint is not None:
            raise bad_request(f"tool_choice {'naming a function' if named else 'required'} and {constraint[2]} "
                              "both constrain the output; give one", "tool_choice")
        lark = tool_parser.forcing_grammar(body.tool_dicts(), body.tool_choice.function.name if named else None,
                                           body.parallel_tool_calls)
        constraint = ("grammar", lark, "tool_choice")
    reasoner = get_reasoning_parser(options.reasoning_parser) if options.reasoning_parser else None
    engine = serving.engine_for(1, body.n)
    check_token_ids(body, int(engine.model_config.vocab_size))
    context = engine.max_model_len

    def prepare():
        prompt = chat_prompt_ids(engine.tokenizer, body.message_dicts(), options.parse_special_tokens_in_content,
                                 body.tool_dicts(), body.add_generation_prompt, body.template_kwargs())
        prompt = truncate_prompt(prompt, body.truncate_prompt_tokens, context)
        opens = reasoner is not None and prompt_opens_thinking(
            engine.tokenizer.decode(prompt[-16:], skip_special_tokens=False))
        # the template opened <think>: the constrained answer comes after the thinking closes (as vLLM applies
        # structured output after the reasoning ends), else the call, JSON or text is parsed as reasoning_content
        prefix = reasoner.close_thinking() if opens and hasattr(reasoner, "close_thinking") else None
        grammar = compile_constraint(constraint, engine, prefix) if constraint else None  # also a bad one's 400
        bad = bad_words_token_ids(engine.tokenizer, body.bad_words or [])
        return prompt, grammar, bad, opens

    prompt, grammar, bad_words, starts_in_think = await serving.off_loop(prepare)
    max_tokens = serving.resolve_max_tokens(body.requested_max_tokens(), None, [len(prompt)], context, "max_tokens")
    if body.min_tokens > max_tokens:
        raise bad_request(f"min_tokens ({body.min_tokens}) exceeds max_tokens ({max_tokens})", "min_tokens")
    check_allowed_tokens(body, bad_words, engine.eos_token_ids)
    top = (body.top_logprobs or 0) if body.logprobs else None
    params = sampling_params(body, max_tokens, logprobs=top, prompt_logprobs=body.prompt_logprobs,
                             bad_words=bad_words, grammar=grammar)
    stop_ids = frozenset()
    if getattr(reasoner, "keeps_special_tokens", False):  # harmony's channel markers are special tokens
        for choice_params in params:
            choice_params.skip_special_tokens = False
        stop_ids = frozenset([*([] if body.ignore_eos else engine.eos_token_ids), *(body.stop_token_ids or [])])
    group = await serving.submit([prompt], params)

    texts = TokenTexts(engine.tokenizer, body.return_tokens_as_token_ids)
    choices = [_Choice(i, reasoner, starts_in_think, tool_parser if body.stream else None, texts, stop_ids)
               for i in range(body.n)]
    usage = Usage(body.n, [len(prompt)])
    request_id, created = new_id("chatcmpl", body.request_id), now()

    def chunk(choice_list: list[dict], with_usage: bool = False) -> dict:
        return stream_chunk(body, usage, request_id, "chat.completion.chunk", created, serving.served_model_name, choice_list,
                            with_usage)

    if body.stream:
        def first_chunks():
            return [chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                            "finish_reason": None}]) for i in range(body.n)]

        def on_output(index, output):
            choice = choices[index]
            first = choice.prompt_logprobs is None and output.prompt_logprobs is not None
            choice.add(output)
            usage.add(index, output)
            if not has_content(output):
                return []
            item = {"index": index, "delta": choice.delta(output, body.include_reasoning),
                    "logprobs": {"content": chat_logprobs(output.logprobs, texts)} if output.logprobs else None,
                    "finish_reason": _finish_reason(output.finish_reason, choice.num_calls > 0, tool_mode, True)
                    if output.finished else None,
                    "stop_reason": output.stop_reason if output.finished else None}
            if first and body.prompt_logprobs is not None:
                item["prompt_logprobs"] = choice.prompt_logprobs
            if body.return_token_ids:
                item["token_ids"] = list(output.new_token_ids)
            return [chunk([item])]

        def final_chunks():
            return [chunk([], with_usage=True)] if body.include_usage_in_stream() else []

        return EventStreamResponse(serving.stream(group, on_output, first_chunks, final_chunks))

    def collect(index, output):
        choices[index].add(output)
        usage.add(index, output)

    await serving.collect(group, collect, request)

    def message(choice: _Choice) -> tuple[dict, str | None]:
        reasoning, content = (None, choice.text) if reasoner is None else reasoner.parse(
            choice.text + choice.stop_marker(), starts_in_think)
        calls = []
        if tool_parser is not None and content is not None:
            content, calls = tool_parser.parse(content)
        out = {"role": "assistant", "content": content}
        if reasoner is not None and body.include_reasoning:
            out["reasoning_content"] = reasoning
        if calls:
            out["tool_calls"] = [c.openai() for c in calls]
        return out, _finish_reason(choice.finish_reason, bool(calls), tool_mode, False)

    results = []
    for c in choices:
        msg, reason = message(c)
        item = {"index": c.index, "message": msg,
                "logprobs": {"content": chat_logprobs(c.logprobs, texts)} if body.logprobs else None,
                "finish_reason": reason, "stop_reason": c.stop_reason}
        if body.prompt_logprobs is not None:
            item["prompt_logprobs"] = c.prompt_logprobs
        if body.return_token_ids:
            item["prompt_token_ids"], item["token_ids"] = prompt, c.token_ids
        results.append(item)
    return JSONResponse({"id": request_id, "object": "chat.completion", "created": created,
                         "model": serving.served_model_name, "choices": results, "usage": usage.as_dict()})

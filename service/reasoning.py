"""Reasoning parsers: the model's thinking -> `reasoning_content`, the rest -> `content` (`--reasoning-parser`).

Qwen3 (and DeepSeek-R1 style) models think inside `<think>...</think>` at the start of their answer. The opening tag
is either generated or already written by the chat template at the end of the prompt (thinking-only templates), so
a parser is told whether the output starts inside the thinking. An output that never closes it is all reasoning when
it started inside, else all content (a model asked not to think writes no tags).
"""

from __future__ import annotations


from service.harmony import HarmonySplitter, tool_call_text
from service.text_holdback import partial_marker_len

THINK, END_THINK = "<think>", "</think>"

# The most thinking (in tokens) a forced tool call may start with when the prompt opened the thinking, as harmony's
# analysis bound (service/tool_parsers/harmony.py, which says why a token bound).
FORCED_THINKING_MAX_TOKENS = 512


class _Streamer:
    def __init__(self, starts_in_think: bool):
        self.buffer = ""
        self.state = "start"  # start: the opening tag may still come; think; content
        self.in_think = starts_in_think

    def feed(self, text: str) -> tuple[str, str]:
        """(new reasoning text, new content text)."""
        self.buffer += text
        reasoning = content = ""
        if self.state == "start":
            stripped = self.buffer.lstrip()
            if THINK.startswith(stripped) and len(stripped) < len(THINK):
                return "", ""  # maybe the opening tag: wait
            if stripped.startswith(THINK):
                self.buffer, self.in_think = stripped[len(THINK):], True
            self.state = "think" if self.in_think else "content"
        if self.state == "think":
            at = self.buffer.find(END_THINK)
            if at < 0:
                keep = partial_marker_len(self.buffer, END_THINK)
                reasoning, self.buffer = self.buffer[: len(self.buffer) - keep], self.buffer[len(self.buffer) - keep:]
                return reasoning, ""
            reasoning, self.buffer, self.state = self.buffer[:at], self.buffer[at + len(END_THINK):], "content"
        content, self.buffer = self.buffer, ""
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        rest, self.buffer = self.buffer, ""
        if self.state == "start":
            return ("", rest) if not self.in_think else (rest, "")
        return (rest, "") if self.state == "think" else ("", rest)


class Qwen3ReasoningParser:
    name = "qwen3"

    def parse(self, text: str, starts_in_think: bool) -> tuple[str | None, str | None]:
        streamer = self.streamer(starts_in_think)
        r1, c1 = streamer.feed(text)
        r2, c2 = streamer.finish()
        reasoning, content = r1 + r2, c1 + c2
        return (reasoning if streamer.in_think else None), (content or None)

    def streamer(self, starts_in_think: bool) -> _Streamer:
        return _Streamer(starts_in_think)

    def close_thinking(self) -> str:
        """Lark rules for the end of a thinking block the prompt opened, then the constrained answer (`@answer`,
        structured_output.grammar_after). Without it a forced call or JSON is written inside the thinking and comes
        back as reasoning_content. The thinking is bounded and holds no "<": llguidance's lexer does not backtrack,
        so text that could run on through "</think>" would never let the model close it; the first "<" starts the
        close."""
        return "\n".join([f'start: thinking_text "{END_THINK}\\n\\n" @answer',
                          f"thinking_text[max_tokens={FORCED_THINKING_MAX_TOKENS}]: /[^<]*/"])


class _HarmonyStreamer:
    """gpt-oss's channels: analysis -> reasoning; final, commentary preambles and text outside harmony -> content; a
    call (a message to `functions.NAME`) -> its canonical form in the content, for the harmony tool parser, whole once
    its body ends; a message to another recipient (a built-in tool) is reasoning on the analysis channel, else left
    out."""

    def __init__(self):
        self.splitter = HarmonySplitter()
        self.call: tuple[str, str] | None = None  # (function name, arguments so far) of a call being read
        self.saw_analysis = False

    def _route(self, pieces) -> tuple[str, str]:
        reasoning = content = ""
        for header, body, ended in pieces:
            recipient = header.recipient if header is not None else None
            if recipient and recipient.startswith("functions."):
                name = recipient.removeprefix("functions.")
                self.call = (name, (self.call[1] if self.call else "") + body)
                if ended:
                    content += tool_call_text(*self.call, complete=True)
                    self.call = None
            elif header is not None and header.channel == "analysis":
                reasoning += body
                self.saw_analysis = True
            elif not recipient:
                content += body
            # else: a message to a built-in tool (python, browser.*), no client function: not for the client, as
            # vLLM leaves it out (on the analysis channel, above, it is reasoning)
        return reasoning, content

    def feed(self, text: str) -> tuple[str, str]:
        return self._route(self.splitter.feed(text))

    def finish(self) -> tuple[str, str]:
        reasoning, content = self._route(self.splitter.finish())
        if self.call is not None:  # cut off inside a call (max_tokens): unterminated, so it stays content
            content += tool_call_text(*self.call, complete=False)
            self.call = None
        return reasoning, content


class HarmonyReasoningParser:
    """gpt-oss (`--reasoning-parser harmony`). The output text must keep its special tokens (the markers), which the
    chat endpoint arranges when `keeps_special_tokens` is set."""

    name = "harmony"
    keeps_special_tokens = True

    def parse(self, text: str, starts_in_think: bool) -> tuple[str | None, str | None]:
        streamer = self.streamer(starts_in_think)
        r1, c1 = streamer.feed(text)
        r2, c2 = streamer.finish()
        return (r1 + r2 if streamer.saw_analysis else None), (c1 + c2 or None)

    def streamer(self, starts_in_think: bool) -> _HarmonyStreamer:
        return _HarmonyStreamer()


REASONING_PARSERS = {"qwen3": Qwen3ReasoningParser, "deepseek_r1": Qwen3ReasoningParser,
                     "harmony": HarmonyReasoningParser}


def get_reasoning_parser(name: str):
    try:
        return REASONING_PARSERS[name]()
    except KeyError:
        raise ValueError(f"unknown reasoning parser {name!r} (known: {', '.join(REASONING_PARSERS)})") from None


def prompt_opens_thinking(prompt_text_tail: str) -> bool:
    """The rendered prompt ends inside an opened, unclosed <think> (the template wrote the tag)."""
    tail = prompt_text_tail.rstrip()
    return tail.endswith(THINK)

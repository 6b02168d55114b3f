"""What every tool-call parser provides (service/tool_parsers/__init__.py has the registry)."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Protocol


@dataclass
class ParsedToolCall:
    name: str
    arguments: dict
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def openai(self, index: int | None = None) -> dict:
        """The OpenAI `tool_calls` item (a stream's delta item carries its `index`)."""
        out = {"id": self.id, "type": "function",
               "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)}}
        return out if index is None else {"index": index, **out}


class BlankHold:
    """A streamer's content as `parse` gives it: `parse` answers None for content that is all whitespace (Qwen3's
    "\\n\\n" after </think>, before its call), so a stream holds whitespace until text that is not comes, and drops
    it if none ever does."""

    def __init__(self):
        self.held = ""
        self.shown = False

    def __call__(self, text: str) -> str:
        if self.shown:
            return text
        self.held += text
        if not self.held.strip():
            return ""
        text, self.held, self.shown = self.held, "", True
        return text


class ToolCallStreamer(Protocol):
    def feed(self, text: str) -> tuple[str, list[ParsedToolCall]]:
        """New content text that is certainly not part of a call, and the calls completed by `text`."""

    def finish(self) -> tuple[str, list[ParsedToolCall]]:
        """At the end: the held-back text (an unterminated call is content) and any last call."""


class ToolParser(Protocol):
    name: str

    def parse(self, text: str) -> tuple[str | None, list[ParsedToolCall]]:
        """(content outside the calls, or None if blank; the calls) of a whole output."""

    def streamer(self) -> ToolCallStreamer: ...

    def forcing_grammar(self, tools: list[dict], name: str | None, parallel: bool) -> str:
        """A Lark grammar (llguidance) whose every sentence is one call of function `name` (None: of any tool; more
        than one when `parallel`) in this format, with arguments valid against the tool's parameters schema."""

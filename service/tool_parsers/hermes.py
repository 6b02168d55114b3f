"""The Hermes tool-call format, which Qwen2.5, Qwen3 and QwQ templates teach their models:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

one block per call. Content is the text outside the blocks. A block whose JSON does not parse, or that never ends,
stays content (the client sees what the model wrote instead of losing it).
"""

from __future__ import annotations

import json
import re

from service.text_holdback import partial_marker_len
from service.tool_parsers.base import BlankHold, ParsedToolCall

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(OPEN) + "(.*?)" + re.escape(CLOSE), re.DOTALL)


def parse_call(body: str) -> ParsedToolCall | None:
    try:
        value = json.loads(body)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):  # some models write the arguments as JSON text
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ParsedToolCall(value["name"], arguments)


class _Streamer:
    def __init__(self):
        self.buffer = ""
        self.in_call = False
        self.after_call = False  # whitespace right after a call separates calls: not content (as in `parse`)
        self.shown = BlankHold()

    def feed(self, text: str) -> tuple[str, list[ParsedToolCall]]:
        self.buffer += text
        content, calls = "", []
        while True:
            if not self.in_call:
                at = self.buffer.find(OPEN)
                if at < 0:
                    keep = partial_marker_len(self.buffer, OPEN)
                    content += self._content(self.buffer[: len(self.buffer) - keep])
                    self.buffer = self.buffer[len(self.buffer) - keep:]
                    return content, calls
                content += self._content(self.buffer[:at])
                self.buffer, self.in_call = self.buffer[at:], True
            end = self.buffer.find(CLOSE)
            if end < 0:
                return content, calls
            block = self.buffer[: end + len(CLOSE)]
            call = parse_call(block[len(OPEN): -len(CLOSE)])
            if call is None:
                content += self._content(block)
            else:
                calls.append(call)
                self.after_call = True
            self.buffer, self.in_call = self.buffer[end + len(CLOSE):], False

    def _content(self, text: str) -> str:
        if self.after_call:
            text = text.lstrip()
            self.after_call = not text
        return self.shown(text)

    def finish(self) -> tuple[str, list[ParsedToolCall]]:
        rest, self.buffer, self.in_call = self.buffer, "", False
        return self._content(rest), []


class HermesToolParser:
    name = "hermes"

    def parse(self, text: str) -> tuple[str | None, list[ParsedToolCall]]:
        calls, content, last = [], [], 0
        for match in _BLOCK.finditer(text):
            call = parse_call(match.group(1))
            if call is None:
                continue  # stays in the content
            content.append(text[last: match.start()] if not calls else text[last: match.start()].lstrip())
            calls.append(call)
            last = match.end()
        content.append(text[last:] if not calls else text[last:].lstrip())  # whitespace after a call: a separator
        joined = "".join(content)
        return (joined if joined.strip() else None), calls

    def streamer(self) -> _Streamer:
        return _Streamer()

    def forcing_grammar(self, tools: list[dict], name: str | None, parallel: bool) -> str:
        chosen = [t for t in tools if name is None or t["function"]["name"] == name]
        rules = []
        for i, tool in enumerate(chosen):
            schema = {"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                      "properties": {"name": {"const": tool["function"]["name"]},
                                     "arguments": tool["function"].get("parameters") or {"type": "object"}},
                      "x-guidance": {"whitespace_flexible": False}}  # compact: random weights would pad forever
            rules.append(f"call_{i}: %json {json.dumps(schema, ensure_ascii=False)}")
        one = f'"{OPEN}\\n" (' + " | ".join(f"call_{i}" for i in range(len(chosen))) + f') "\\n{CLOSE}"'
        many = parallel and name is None  # a named function is called exactly once
        start = f"start: block (\"\\n\" block)*\nblock: {one}" if many else f"start: {one}"
        return "\n".join([start, *rules])

"""Tool calls of gpt-oss (the harmony format, service/harmony.py): a message on the commentary channel addressed to
`functions.NAME`, whose body is the JSON arguments. The harmony reasoning parser (`--reasoning-parser harmony`)
splits the channels and passes each call on in the content in one canonical form,

    <|channel|>commentary to=functions.NAME <|constrain|>json<|message|>{...}<|call|>

which this parser turns into `tool_calls`; a call whose arguments are not a JSON object, or that never ends, stays
content. Forcing a call (tool_choice required or named) is refused for now: its grammar would name harmony's
markers as special tokens (llguidance's Lark grammars can: tests/test_harmony_http.py forces whole harmony answers
so) and would have to decide how much analysis may come before the call; not written yet.
"""

from __future__ import annotations

import json
import re

from service.errors import bad_request
from service.harmony import CALL, CHANNEL, CONSTRAIN, MESSAGE
from service.text_holdback import partial_marker_len
from service.tool_parsers.base import ParsedToolCall

_SEGMENT = re.compile(re.escape(CHANNEL) + r"commentary to=functions\.(\S+?) " + re.escape(CONSTRAIN) + "json"
                      + re.escape(MESSAGE) + "(.*?)" + re.escape(CALL), re.DOTALL)


def _call(match: re.Match) -> ParsedToolCall | None:
    try:
        arguments = json.loads(match.group(2))
    except ValueError:
        return None
    return ParsedToolCall(match.group(1), arguments) if isinstance(arguments, dict) else None


class _Streamer:
    def __init__(self):
        self.buffer = ""

    def feed(self, text: str) -> tuple[str, list[ParsedToolCall]]:
        self.buffer += text
        content, calls = "", []
        while True:
            at = self.buffer.find(CHANNEL)
            if at < 0:
                keep = partial_marker_len(self.buffer, CHANNEL)
                content += self.buffer[: len(self.buffer) - keep]
                self.buffer = self.buffer[len(self.buffer) - keep:]
                return content, calls
            content, self.buffer = content + self.buffer[:at], self.buffer[at:]
            end = self.buffer.find(CALL)
            if end < 0:
                return content, calls
            segment, self.buffer = self.buffer[: end + len(CALL)], self.buffer[end + len(CALL):]
            match = _SEGMENT.fullmatch(segment)
            call = _call(match) if match else None
            if call is None:
                content += segment
            else:
                calls.append(call)

    def finish(self) -> tuple[str, list[ParsedToolCall]]:
        rest, self.buffer = self.buffer, ""
        return rest, []


class HarmonyToolParser:
    name = "harmony"

    def parse(self, text: str) -> tuple[str | None, list[ParsedToolCall]]:
        calls, content, last = [], [], 0
        for match in _SEGMENT.finditer(text):
            call = _call(match)
            if call is None:
                continue
            content.append(text[last: match.start()])
            calls.append(call)
            last = match.end()
        content.append(text[last:])
        joined = "".join(content)
        return (joined if joined.strip() else None), calls

    def streamer(self) -> _Streamer:
        return _Streamer()

    def forcing_grammar(self, tools: list[dict], name: str | None, parallel: bool) -> str:
        raise bad_request("tool_choice 'required' or a named function is not supported with the harmony format "
                          "yet; use 'auto'", "tool_choice")

"""Tool calls of gpt-oss (the harmony format, service/harmony.py): a message on the commentary channel addressed to
`functions.NAME`, whose body is the JSON arguments. The harmony reasoning parser (`--reasoning-parser harmony`)
splits the channels and passes each call on in the content in one canonical form,

    <|channel|>commentary to=functions.NAME <|constrain|>json<|message|>{...}<|call|>

which this parser turns into `tool_calls`; a call whose arguments are not a JSON object, or that never ends, stays
content.

Forcing a call (tool_choice "required" or a named function): a Lark grammar (llguidance) whose sentences are an
optional, bounded analysis message, then one call on the commentary channel whose JSON arguments validate against
the tool's `parameters`, the markers named as special tokens (`<|channel|>` in a Lark rule is the token; quoted it
would be seven characters of text). Harmony ends the turn at `<|call|>` (an EOS token of gpt-oss), so a turn holds
exactly one call: `parallel_tool_calls: true` still gets one, which "required" (at least one) allows; the client
sends the result back and the next turn may call again.
"""

from __future__ import annotations

import json
import re

from service.errors import bad_request
from service.harmony import CALL, CHANNEL, CONSTRAIN, END, MESSAGE, START
from service.text_holdback import partial_marker_len
from service.tool_parsers.base import BlankHold, ParsedToolCall

# The most analysis (in tokens) a forced call may start with. The client has decided that a call comes, so the
# analysis is a plan of it: 512 tokens hold a few paragraphs of planning, and the bound keeps what the call costs
# beyond its arguments known (512 plus the two headers, a few dozen tokens), so a max_tokens above that plus the
# arguments always reaches `<|call|>`. A model that would think longer is made to end its analysis there and call.
# A token bound (llguidance's `max_tokens` on the text's rule) rather than a character one: it is what max_tokens and
# the cost count, and a bounded-repetition regex of ~1000 characters that also excludes "<|" is too large for
# llguidance's lexer ("too many expressions constructed"). The option turns off grammar rollback, which the engine
# never does.
ANALYSIS_MAX_TOKENS = 512

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
        self.shown = BlankHold()

    def feed(self, text: str) -> tuple[str, list[ParsedToolCall]]:
        self.buffer += text
        content, calls = "", []
        while True:
            at = self.buffer.find(CHANNEL)
            if at < 0:
                keep = partial_marker_len(self.buffer, CHANNEL)
                content += self.shown(self.buffer[: len(self.buffer) - keep])
                self.buffer = self.buffer[len(self.buffer) - keep:]
                return content, calls
            content, self.buffer = content + self.shown(self.buffer[:at]), self.buffer[at:]
            end = self.buffer.find(CALL)
            if end < 0:
                return content, calls
            segment, self.buffer = self.buffer[: end + len(CALL)], self.buffer[end + len(CALL):]
            match = _SEGMENT.fullmatch(segment)
            call = _call(match) if match else None
            if call is None:
                content += self.shown(segment)
            else:
                calls.append(call)

    def finish(self) -> tuple[str, list[ParsedToolCall]]:
        rest, self.buffer = self.buffer, ""
        return self.shown(rest), []


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
        chosen = [t["function"] for t in tools if name is None or t["function"]["name"] == name]
        if not chosen:
            raise bad_request(f"tool_choice names {name!r}, which is not in tools", "tool_choice.function.name")
        calls = []
        for i, fn in enumerate(chosen):
            schema = dict(fn.get("parameters") or {"type": "object"})
            schema.setdefault("type", "object")  # harmony arguments are an object (the parser keeps nothing else)
            schema["x-guidance"] = {"whitespace_flexible": False}  # compact: random weights would pad forever
            calls.append(f"call_{i}: {CHANNEL} {json.dumps('commentary to=functions.' + fn['name'] + ' ')} "
                         f"{CONSTRAIN} \"json\" {MESSAGE} args_{i} {CALL}\n"
                         f"args_{i}: %json {json.dumps(schema, ensure_ascii=False)}")
        return "\n".join([
            "start: analysis? (" + " | ".join(f"call_{i}" for i in range(len(chosen))) + ")",
            f"analysis: {CHANNEL} \"analysis\" {MESSAGE} analysis_text {END} {START} \"assistant\"",
            # any text without "<|", which the harmony parser (it reads text) could take for the start of a marker
            f"analysis_text[max_tokens={ANALYSIS_MAX_TOKENS}]: /(?s:.*)/ & ~/(?s:.*)<\\|(?s:.*)/",
            *calls])

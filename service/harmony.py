"""The harmony format gpt-oss writes its answers in (OpenAI's published format), read from the output text with its
special tokens kept: a sequence of messages

    <|channel|>analysis<|message|>thinking...<|end|>
    <|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}<|call|>
    <|start|>assistant<|channel|>final<|message|>the answer<|return|>

(the prompt ends with `<|start|>assistant`, so the output opens with the first message's header). A header names the
channel and, for a tool call, the recipient (`to=functions.NAME`, before or after the channel); a body runs to
`<|end|>`, `<|call|>` or `<|return|>`. `HarmonySplitter` turns streamed text into (header, body text, ended)
pieces, holding back a tail that may be the start of a marker. The `openai-harmony` package parses the same format
but loads its tokenizer by download at run time, which offline servers cannot do; this reader needs only the text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from service.text_holdback import partial_marker_len

START, CHANNEL, MESSAGE, CONSTRAIN = "<|start|>", "<|channel|>", "<|message|>", "<|constrain|>"
END, CALL, RETURN = "<|end|>", "<|call|>", "<|return|>"
BODY_ENDS = (END, CALL, RETURN)
_RECIPIENT = re.compile(r"\bto=(\S+)")
_CHANNEL = re.compile(re.escape(CHANNEL) + r"\s*([^\s<]+)")


@dataclass(frozen=True)
class Header:
    channel: str | None  # analysis, commentary, final, ... (None: the header named none)
    recipient: str | None  # e.g. functions.get_weather for a tool call

    @staticmethod
    def parse(text: str) -> "Header":
        channel = _CHANNEL.search(text)
        recipient = _RECIPIENT.search(text)
        return Header(channel[1] if channel else None, recipient[1].split("<")[0] if recipient else None)


def _hold(text: str, markers) -> int:
    return max(partial_marker_len(text, m) for m in markers)


class HarmonySplitter:
    """feed(text) -> [(header, body piece, ended)]; finish() -> the pieces of what was held back. Text before any
    `<|message|>` ever appears (a model not writing harmony) comes out as a body with header None at finish."""

    def __init__(self):
        self.buffer = ""
        self.header: Header | None = None  # None: reading a header
        self.seen_message = False

    def feed(self, text: str) -> list[tuple[Header | None, str, bool]]:
        self.buffer += text
        pieces = []
        while True:
            if self.header is None:
                at = self.buffer.find(MESSAGE)
                if at < 0:
                    return pieces
                self.header, self.buffer, self.seen_message = Header.parse(self.buffer[:at]), \
                    self.buffer[at + len(MESSAGE):], True
            ends = [(self.buffer.find(m), m) for m in BODY_ENDS if m in self.buffer]
            if not ends:
                keep = _hold(self.buffer, BODY_ENDS)
                body, self.buffer = self.buffer[: len(self.buffer) - keep], self.buffer[len(self.buffer) - keep:]
                if body:
                    pieces.append((self.header, body, False))
                return pieces
            at, marker = min(ends)
            pieces.append((self.header, self.buffer[:at], True))
            self.buffer, self.header = self.buffer[at + len(marker):], None

    def finish(self) -> list[tuple[Header | None, str, bool]]:
        rest, self.buffer = self.buffer, ""
        if self.header is not None:
            return [(self.header, rest, True)] if rest else []
        if not self.seen_message and rest.strip():
            return [(None, rest, True)]  # no harmony at all: plain text
        return []  # an unfinished header carries no text


def tool_call_text(name: str, arguments: str, complete: bool) -> str:
    """A call re-written in one canonical harmony form, which the harmony tool parser reads from the content."""
    return f"{CHANNEL}commentary to=functions.{name} {CONSTRAIN}json{MESSAGE}{arguments}{CALL if complete else ''}"

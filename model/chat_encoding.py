"""Chat prompts whose message text stays text: a special-token string typed into a message (`<|im_end|>`) is encoded
as the characters it is, not as the control token the chat template writes, so a user cannot close their own turn
and open a system one (role spoofing). `parse_special_tokens_in_content=True` restores the plain behaviour (the whole
rendered prompt parsed for special tokens).

How: before rendering, each special-token string in a message's content becomes a private-use placeholder; the
rendered prompt is encoded piece by piece, the template's text with special tokens parsed, each placeholder as
the plain text it stands for. Prompts without such strings are encoded in one piece, exactly as before.
"""

from __future__ import annotations

import re
from typing import Callable

_OPEN, _CLOSE = "\ue000", "\ue001"  # private-use characters: the placeholder's delimiters
_PLACEHOLDER = re.compile(f"{_OPEN}(\\d+){_CLOSE}")


def encode_chat(messages: list[dict], special_tokens: list[str],
                render: Callable[[list[dict], list | None, dict], str], encode: Callable[[str], list[int]],
                encode_plain: Callable[[str], list[int]], parse_special_tokens_in_content: bool = False,
                tools: list[dict] | None = None, template_kwargs: dict | None = None) -> list[int]:
    """`render(messages, tools, template_kwargs)` renders the template; `encode` parses special tokens,
    `encode_plain` does not; neither adds the tokenizer's BOS/EOS. Every string the client wrote (content, tool
    calls, tool definitions, dictionary keys among them, template variables' values) keeps special-token text as
    text."""
    template_kwargs = template_kwargs or {}
    if parse_special_tokens_in_content or not special_tokens:
        return encode(render(messages, tools, template_kwargs))
    # the delimiters themselves are escaped too, so content cannot forge a placeholder
    pattern = re.compile("|".join(re.escape(t) for t in sorted([*special_tokens, _OPEN, _CLOSE], key=len,
                                                                reverse=True)))
    literals: list[str] = []

    def mark(match: re.Match) -> str:
        literals.append(match.group(0))
        return f"{_OPEN}{len(literals) - 1}{_CLOSE}"

    def marked(value):
        if isinstance(value, str):
            return pattern.sub(mark, value)
        if isinstance(value, dict):  # keys too: templates print them (tojson of arguments, parameter names)
            return {marked(k): marked(v) for k, v in value.items()}
        if isinstance(value, list):
            return [marked(v) for v in value]
        return value

    # a message's own role is the template's to compare ("user", ...); a "role" inside arguments is client text
    marked_messages = [{k: v if k == "role" else marked(v) for k, v in m.items()} for m in messages]
    marked_tools = marked(tools)
    marked_kwargs = {name: marked(v) for name, v in template_kwargs.items()}  # the names are the template's
    if not literals:
        return encode(render(messages, tools, template_kwargs))
    ids: list[int] = []
    pieces = _PLACEHOLDER.split(render(marked_messages, marked_tools, marked_kwargs))  # template text, literal index, ...
    for i, piece in enumerate(pieces):
        if i % 2:
            ids += encode_plain(literals[int(piece)])
        elif piece:
            ids += encode(piece)
    return ids

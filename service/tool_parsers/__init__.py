"""Tool-call parsers: model output text -> OpenAI `tool_calls`, whole (`parse`) or as a stream (`streamer`), plus the
grammar that forces a call in the model's own format (tool_choice "required" or a named function).

A registry by name (`--tool-call-parser`), so a model family with another format adds one module here.
"""

from __future__ import annotations

from service.tool_parsers.base import ParsedToolCall, ToolParser
from service.tool_parsers.harmony import HarmonyToolParser
from service.tool_parsers.hermes import HermesToolParser

PARSERS: dict[str, type[ToolParser]] = {"hermes": HermesToolParser, "harmony": HarmonyToolParser}


def get_tool_parser(name: str) -> ToolParser:
    try:
        return PARSERS[name]()
    except KeyError:
        raise ValueError(f"unknown tool-call parser {name!r} (known: {', '.join(PARSERS)})") from None


__all__ = ["PARSERS", "ParsedToolCall", "ToolParser", "get_tool_parser"]

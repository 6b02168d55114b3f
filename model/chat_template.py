"""Render a Hugging Face chat template (Jinja) the way transformers does: a sandboxed environment with trimmed
blocks, loop controls, `raise_exception`, `strftime_now`, a `tojson` that does not HTML-escape, and
`{% generation %}` blocks rendered as plain text. History tool-call arguments are dicts that also print (and join
with `+`) as their JSON text, for templates that treat them as strings (DeepSeek-V3)."""

import functools
import json
from datetime import datetime

import jinja2
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    """Bad messages or a template that refuses them (raise_exception) or fails to render."""


class _GenerationBlock(Extension):
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _Arguments(dict):
    """History tool-call arguments: the dict transformers' convention gives templates (`.items()`, `| tojson`), which
    prints as its JSON text where a template writes it as a string (DeepSeek-V3's `'```json\\n' + arguments`):
    a plain dict made that `+` fail and `{{ arguments }}` print a Python repr."""

    def __str__(self) -> str:
        return json.dumps(self, ensure_ascii=False)

    def __add__(self, other):
        return str(self) + other if isinstance(other, str) else NotImplemented

    def __radd__(self, other):
        return other + str(self) if isinstance(other, str) else NotImplemented


def _with_arguments(message: dict) -> dict:
    calls = message.get("tool_calls")
    if not isinstance(calls, list) or not any(isinstance(c, dict) and isinstance(c.get("function"), dict)
                                              and isinstance(c["function"].get("arguments"), dict) for c in calls):
        return message
    wrapped = []
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict) and isinstance(function.get("arguments"), dict):
            call = {**call, "function": {**function, "arguments": _Arguments(function["arguments"])}}
        wrapped.append(call)
    return {**message, "tool_calls": wrapped}


@functools.lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationBlock, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def check_chat_template(template: str) -> None:
    """Compile `template` (cached for rendering); a Jinja syntax error is a ChatTemplateError."""
    try:
        _compile(template)
    except jinja2.exceptions.TemplateSyntaxError as err:
        raise ChatTemplateError(f"chat template does not parse (line {err.lineno}): {err.message}") from err


def render_chat_template(template: str, messages: list[dict], add_generation_prompt: bool = True, **variables) -> str:
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise ChatTemplateError("messages must be a list of objects with a 'role'")
    messages = [_with_arguments(m) for m in messages]
    try:
        return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)
    except jinja2.exceptions.TemplateError as err:
        raise ChatTemplateError(f"chat template failed: {err}") from err

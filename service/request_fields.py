"""Unknown request fields: a 400 naming the first one (the default), or accepted and ignored with a warning in
the log (--ignore-unknown-fields, vLLM's behaviour). Either way nothing a client sends is ignored unannounced.

pydantic keeps fields no model declares in `model_extra` (service/protocol.py: extra="allow"); this walks the
parsed request, nested models and lists of them included, for the first such field and its dotted path. Fields
typed as free-form objects (a JSON schema, logit_bias, chat_template_kwargs, metadata) are the client's own.
"""

from __future__ import annotations

import functools
import logging
import typing

from pydantic import BaseModel

from service.errors import bad_request

logger = logging.getLogger("staticmoe.service")


def unknown_fields(model: BaseModel, path: str = "") -> list[str]:
    found = [f"{path}{name}" for name in (model.model_extra or {})]
    fields = type(model).model_fields
    for name in _fields_that_may_hold_models(type(model)):
        value = getattr(model, name)
        field_path = f"{path}{fields[name].alias or name}"
        if isinstance(value, BaseModel):
            found += unknown_fields(value, field_path + ".")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, BaseModel):
                    found += unknown_fields(item, f"{field_path}.{i}.")
    return found


@functools.cache
def _fields_that_may_hold_models(cls: type[BaseModel]) -> tuple[str, ...]:
    """The fields whose type names a model anywhere (a model, a list or union of them), in declaration order. Only
    those are walked: a prompt of 4k token ids walked item by item cost ~0.6 ms of the event loop per request
    (benchmarks/NOTES.md, "the olmoe lockstep burst"). Free-form fields (Any, dict) hold plain JSON, never models."""
    return tuple(name for name, field in cls.model_fields.items() if _names_a_model(field.annotation))


def _names_a_model(annotation) -> bool:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return True
    return any(_names_a_model(arg) for arg in typing.get_args(annotation))


def check_unknown_fields(body: BaseModel, ignore: bool) -> None:
    unknown = unknown_fields(body)
    if not unknown:
        return
    if ignore:
        logger.warning("ignored unknown request field(s): %s", ", ".join(unknown[:10]))
        return
    raise bad_request(f"Unknown field '{unknown[0]}' (this server honours or refuses every field it knows; "
                      f"--ignore-unknown-fields accepts and ignores others)", unknown[0], "unknown_field")

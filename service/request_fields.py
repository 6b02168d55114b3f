"""Unknown request fields: a 400 naming the first one (the default), or accepted and ignored with a warning in
the log (--ignore-unknown-fields, vLLM's behaviour). Either way nothing a client sends is ignored unannounced.

pydantic keeps fields no model declares in `model_extra` (service/protocol.py: extra="allow"); this walks the
parsed request, nested models and lists of them included, for the first such field and its dotted path. Fields
typed as free-form objects (a JSON schema, logit_bias, chat_template_kwargs, metadata) are the client's own.
"""

from __future__ import annotations

import logging

from pydantic import BaseModel

from service.errors import bad_request

logger = logging.getLogger("staticmoe.service")


def unknown_fields(model: BaseModel, path: str = "") -> list[str]:
    found = [f"{path}{name}" for name in (model.model_extra or {})]
    for name in type(model).model_fields:
        value = getattr(model, name)
        field_path = f"{path}{type(model).model_fields[name].alias or name}"
        if isinstance(value, BaseModel):
            found += unknown_fields(value, field_path + ".")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, BaseModel):
                    found += unknown_fields(item, f"{field_path}.{i}.")
    return found


def check_unknown_fields(body: BaseModel, ignore: bool) -> None:
    unknown = unknown_fields(body)
    if not unknown:
        return
    if ignore:
        logger.warning("ignored unknown request field(s): %s", ", ".join(unknown[:10]))
        return
    raise bad_request(f"Unknown field '{unknown[0]}' (this server honours or refuses every field it knows; "
                      f"--ignore-unknown-fields accepts and ignores others)", unknown[0], "unknown_field")

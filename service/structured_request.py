"""Which output constraint a request asks for, in any of the spellings clients use, as (kind, spec, field):
OpenAI's `response_format` (json_object, json_schema), vLLM's `structured_outputs` (json, regex, choice, grammar,
json_object) and its older `guided_json` / `guided_regex` / `guided_choice` / `guided_grammar`. At most one may be
given; the grammar is compiled by model/engine/structured_output.py, where a bad schema becomes a 400 naming the
field."""

from __future__ import annotations

import json
import logging
import threading

from model.engine.structured_output import (Grammar, GrammarError, GrammarUnavailable, compile_grammar,
                                            grammar_tokenizer)
from service.errors import bad_request
from service.protocol import SamplingRequest

logger = logging.getLogger("staticmoe.service")
Constraint = tuple[str, object, str]  # (kind, spec, the request field it came from)


def requested_constraint(body: SamplingRequest) -> Constraint | None:
    found: list[Constraint] = []
    fmt = body.response_format
    if fmt is not None and fmt.type == "json_object":
        found.append(("json_object", None, "response_format"))
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise bad_request("response_format json_schema needs json_schema.schema", "response_format.json_schema")
        found.append(("json_schema", fmt.json_schema.schema_, "response_format.json_schema.schema"))
    so = body.structured_outputs
    if so is not None:
        given = [(kind, value, f"structured_outputs.{name}") for kind, name, value in (
            ("json_schema", "json", so.json_), ("regex", "regex", so.regex), ("choice", "choice", so.choice),
            ("grammar", "grammar", so.grammar), ("json_object", "json_object", so.json_object or None))
            if value is not None]
        if not given:
            raise bad_request("structured_outputs names no constraint (json, regex, choice, grammar or "
                              "json_object)", "structured_outputs")
        found += given
    for kind, name in (("json_schema", "guided_json"), ("regex", "guided_regex"), ("choice", "guided_choice"),
                       ("grammar", "guided_grammar")):
        if getattr(body, name) is not None:
            found.append((kind, getattr(body, name), name))
    if len(found) > 1:
        raise bad_request(f"Give one output constraint, not {', '.join(f[2] for f in found)}", found[1][2])
    if not found:
        return None
    kind, spec, field = found[0]
    if kind == "json_schema" and isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except ValueError:
            raise bad_request("The JSON schema is not valid JSON", field) from None
        if not isinstance(spec, (dict, bool)):
            raise bad_request("The JSON schema must be an object", field)
    return kind, spec, field


def index_vocabulary_ahead(engine) -> threading.Thread:
    """Builds the grammar engine's index of the tokenizer (~1 s for 150k tokens) on a daemon thread at start-up, so
    the first constrained request does not wait for it, and a tokenizer llguidance cannot index is reported in the
    log when the server starts rather than at the first request (which then gets a 400)."""

    def index() -> None:
        try:
            grammar_tokenizer(engine.tokenizer, int(engine.model_config.vocab_size), list(engine.eos_token_ids))
        except GrammarUnavailable as err:
            logger.warning("%s; constrained requests (response_format, structured_outputs, forced tool calls) will "
                           "get a 400", err)

    thread = threading.Thread(target=index, name="grammar-vocabulary", daemon=True)
    thread.start()
    return thread


def compile_constraint(constraint: Constraint, engine, prefix_lark: str | None = None) -> Grammar:
    """Runs on the tokenizer threads (compiling a schema takes milliseconds, building the vocabulary once ~1 s).
    `prefix_lark`: text the output starts with before the constraint applies (closing a thinking block)."""
    kind, spec, field = constraint
    try:
        return compile_grammar(kind, spec, engine.tokenizer, int(engine.model_config.vocab_size),
                               list(engine.eos_token_ids), prefix_lark)
    except GrammarUnavailable as err:
        raise bad_request(str(err), field, "structured_output_unavailable") from None
    except GrammarError as err:
        raise bad_request(f"Invalid {kind.replace('_', ' ')}: {str(err)[:500]}", field, "invalid_grammar") from None

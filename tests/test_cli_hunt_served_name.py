"""`--served-model-name a b` (vLLM's form: several names, the first reported) gets one line saying this server takes
one name. Was: `unrecognized arguments: b`, which names neither the flag nor the reason."""

from __future__ import annotations

import pytest

from service import cli
from tests.cli_fixtures import clean_env, parse  # noqa: F401 (clean_env: autouse here)


def test_several_served_model_names_are_refused_naming_the_flag():
    with pytest.raises(SystemExit) as exit_info:
        cli.resolve_model(parse("--served-model-name", "my-moe", "alias"))
    message = str(exit_info.value)
    assert "--served-model-name" in message and "one name" in message and "alias" in message, message


def test_one_name_from_the_flag_or_the_variable_is_served(monkeypatch):
    assert cli.resolve_model(parse("--served-model-name", "my-moe"))[2] == "my-moe"
    monkeypatch.setenv("STATICMOE_SERVED_MODEL_NAME", "env-moe")
    assert cli.resolve_model(parse())[2] == "env-moe"
    assert cli.resolve_model(parse("--served-model-name", "flag-moe"))[2] == "flag-moe"

"""STATICMOE_* variables set to an empty string count as unset, for every flag (compose's `${X:-}` and a
Kubernetes `value: ""` produce them; docs/deploy.md's `-e STATICMOE_MODEL=` relies on it). Was: it held only for the
flags whose empty value happened to be falsy; STATICMOE_PORT= or STATICMOE_MAX_MODEL_LEN= stopped the server
(`invalid literal for int()`), STATICMOE_DTYPE= / STATICMOE_TOOL_CALL_PARSER= were refused as no choice,
STATICMOE_CHAT_TEMPLATE= was opened as a file named '', and STATICMOE_HOST= bound every interface."""

from __future__ import annotations

import pytest

from service import cli
from tests.cli_fixtures import clean_env, parse  # noqa: F401 (clean_env: autouse here)


@pytest.mark.parametrize("flag", ["--port", "--max-model-len", "--dtype", "--tool-call-parser", "--chat-template",
                                  "--host", "--device", "--max-queue", "--read-timeout", "--log-level", "--seed",
                                  "--quantization", "--allowed-hosts", "--enforce-eager"])
@pytest.mark.parametrize("empty", ["", "  "])
def test_an_empty_variable_is_the_flag_not_given(flag, empty, monkeypatch):
    dest = flag[2:].replace("-", "_")
    unset = getattr(parse(), dest)
    monkeypatch.setenv(cli.env_name(flag), empty)
    assert getattr(parse(), dest) == unset


def test_an_empty_host_variable_binds_loopback_not_every_interface(monkeypatch):
    monkeypatch.setenv("STATICMOE_HOST", "")
    args = parse()
    assert args.host == "127.0.0.1"
    cli.service_settings(args, "tiny")  # loopback: no key needed


def test_a_non_empty_bad_value_is_still_refused(monkeypatch):
    monkeypatch.setenv("STATICMOE_PORT", "x")
    with pytest.raises(SystemExit, match="STATICMOE_PORT"):
        parse()

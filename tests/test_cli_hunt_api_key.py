"""An API key no client can send is refused at start-up, naming the flag. HTTP trims the whitespace around a header
value and forbids control characters in it, so a key that ends in a newline (a Kubernetes Secret or a file read
with its trailing newline) or holds a control character never matches any request. Was: accepted, and every request got 401 (checked: STATICMOE_API_KEY="abc\n",
`Authorization: Bearer abc` -> 401; httpx refuses to send the newline)."""

from __future__ import annotations

import httpx
import pytest

from service import cli
from service.settings import ServiceSettings
from tests.cli_fixtures import clean_env  # noqa: F401 (clean_env: autouse here)
from tests.service_fixtures import ServerProcess


def settings_of(*argv):
    args = cli.build_parser().parse_args(["serve", *argv])
    return cli.service_settings(args, "tiny")


@pytest.mark.parametrize("key", ["secret\n", " secret", "secret ", "sec\x00ret", "sec\nret", "\t", "sec\x7fret"])
def test_a_key_no_header_can_carry_is_refused_naming_the_flag(key, monkeypatch):
    with pytest.raises(SystemExit, match="--api-key"):
        settings_of("--api-key", key)
    if "\x00" not in key and key.strip():  # the environment cannot hold a NUL; a blank variable is unset
        monkeypatch.setenv("STATICMOE_API_KEY", key)
        with pytest.raises(SystemExit, match="STATICMOE_API_KEY"):
            settings_of()
    with pytest.raises(ValueError):
        ServiceSettings(api_key=key)


@pytest.mark.parametrize("key", ["secret", "a b", "clé-ü", "x" * 200])
def test_keys_a_client_can_send_are_kept_as_given(key):
    assert settings_of("--api-key", key).api_key == key


def test_a_key_with_a_space_inside_works_over_http():
    """The check refuses only what cannot match: a space inside a key is sent and compared as is."""
    server = ServerProcess(["--api-key", "two words"], api_key="two words")
    try:
        server.wait_healthy()
        assert httpx.get(server.base_url + "/v1/models", headers=server.headers).status_code == 200
        assert httpx.get(server.base_url + "/v1/models", headers={"Authorization": "Bearer two"}).status_code == 401
    finally:
        server.stop()


def test_a_blank_key_variable_is_no_key_and_an_open_host_still_fails_closed(monkeypatch):
    monkeypatch.setenv("STATICMOE_API_KEY", "\n")
    assert settings_of().api_key is None
    with pytest.raises(SystemExit, match="no API key"):
        settings_of("--host", "0.0.0.0")

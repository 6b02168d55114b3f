"""`--chat-template` takes a file or, as vLLM's does, the template itself: a value that is no file but holds Jinja's
`{`/`}` or a newline is the template (its backslash escapes such as \\n read as in vLLM). Was: `No such file or
directory` for a vLLM command line or compose file that passed the template inline. A value that looks like a
path and is not a file is still refused, naming the flag."""

from __future__ import annotations

import httpx
import pytest

from service import cli
from tests.service_fixtures import ServerProcess
from tests.test_cli_refusals import assert_clean_refusal, run_serve

INLINE = "{% for m in messages %}[{{ m.role }}]{{ m.content }}\\n{% endfor %}{% if add_generation_prompt %}>{% endif %}"


def test_an_inline_template_is_read_as_the_template():
    template = cli.read_chat_template(INLINE)
    assert template == INLINE.replace("\\n", "\n")


def test_escapes_keep_non_ascii_text():
    assert cli.read_chat_template("{{ 'héllo ✓' }}\\t") == "{{ 'héllo ✓' }}\t"


def test_a_file_still_wins_and_a_missing_path_is_refused(tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text("{{ messages[0].content }}")
    assert cli.read_chat_template(str(path)) == "{{ messages[0].content }}"
    with pytest.raises(SystemExit, match="--chat-template"):
        cli.read_chat_template(str(tmp_path / "missing.jinja"))


def test_an_inline_template_with_a_syntax_error_is_refused():
    assert_clean_refusal(*run_serve(["--chat-template", "{% if %}broken"]), "--chat-template")


def test_an_inline_template_renders_chat_requests():
    server = ServerProcess(["--chat-template", INLINE])
    try:
        server.wait_healthy()
        reply = httpx.post(server.base_url + "/tokenize", json={"messages": [{"role": "user", "content": "hi"}]},
                           timeout=30)
        assert reply.status_code == 200, reply.text
        assert bytes(reply.json()["tokens"]) == b"[user]hi\n>"  # the tiny model's byte tokenizer
    finally:
        server.stop()

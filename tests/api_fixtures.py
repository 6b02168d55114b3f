"""A server with issue 20's optional features on, shared by the API tests (session scope): a chat template that
renders tools (tests/templates/tool_chat.jinja, Qwen3 style), the qwen3 reasoning parser, vLLM metric names and
--ignore-unknown-fields. Tests of the defaults use `served` (tests/service_fixtures.py)."""

from __future__ import annotations

import openai
import pytest

from tests.service_fixtures import API_KEY, REPO_ROOT, ServerProcess

TOOL_TEMPLATE = REPO_ROOT / "tests" / "templates" / "tool_chat.jinja"
API_MAX_MODEL_LEN = 2048


@pytest.fixture(scope="session")
def api_server():
    server = ServerProcess(["--max-num-seqs", "32", "--max-queue", "64", "--max-model-len", str(API_MAX_MODEL_LEN),
                            "--chat-template", str(TOOL_TEMPLATE), "--reasoning-parser", "qwen3",
                            "--vllm-metric-names", "--ignore-unknown-fields"],
                           env={"STATICMOE_API_KEY": API_KEY}, api_key=API_KEY)
    try:
        yield server.wait_healthy()
    finally:
        server.stop()


@pytest.fixture(scope="session")
def api(api_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=api_server.base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)

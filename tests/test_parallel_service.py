"""`staticmoe serve --tensor-parallel 2 --expert-parallel 2` on loopback (gloo on the CPU): a real HTTP request is
answered as one rank answers it, /health and the expert metrics work, and killing a worker rank ends the server with
a non-zero exit status within seconds (instead of a server that hangs on its next step), so a restart policy acts."""

import os
import re
import signal
import time

import httpx
import pytest

from model.engine import EngineConfig, LLMEngine, SamplingParams
from tests.engine_fixtures import GREEDY, one_cpu_thread, run, text_of  # noqa: F401
from tests.service_fixtures import ServerProcess, metric, parse_metrics

PROMPT = [72, 101, 108, 108, 111, 44, 32, 119, 111, 114, 108, 100]  # token ids of the tiny byte tokenizer
MAX_TOKENS = 10


def worker_pid(server: ServerProcess) -> int:
    found = re.search(r"parallel worker rank 1 started \(pid (\d+)\)", server.log_text())
    assert found, server.log_text()
    return int(found.group(1))


@pytest.fixture(scope="module")
def expected_text() -> str:
    engine = LLMEngine(EngineConfig(model="tiny", max_model_len=256, max_num_seqs=4))
    outs = run(engine, {"r": (PROMPT, SamplingParams(max_tokens=MAX_TOKENS, **GREEDY))})["r"]
    assert len(text_of(outs)) >= 5  # enough characters to tell two generations apart
    return text_of(outs)


def test_two_rank_server_answers_as_one_rank_and_exits_when_a_rank_dies(expected_text):
    server = ServerProcess(["--tensor-parallel", "2", "--expert-parallel", "2", "--max-model-len", "256",
                            "--max-num-seqs", "4", "--collective-timeout", "30"])
    try:
        server.wait_healthy(timeout=90)
        body = {"model": "tiny", "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
        response = httpx.post(server.base_url + "/v1/completions", json=body, timeout=60)
        assert response.status_code == 200, response.text
        choice = response.json()["choices"][0]
        assert choice["text"] == expected_text and choice["finish_reason"] == "length"
        samples = parse_metrics(server.metrics_text())
        assert metric(samples, "staticmoe_generation_tokens_total") == MAX_TOKENS
        per_expert = [metric(samples, "staticmoe_expert_tokens_total", layer=0, expert=e) for e in range(8)]
        assert sum(per_expert[4:]) > 0, "experts held by rank 1 are counted too"

        os.kill(worker_pid(server), signal.SIGKILL)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and server.proc.poll() is None:
            time.sleep(0.2)
        assert server.proc.poll() == 1, f"server still running 15 s after a rank died:\n{server.log_text()}"
        assert "rank 1" in server.log_text()
    finally:
        server.stop()

"""Real staticmoe servers for the service tests: `python -m service serve` in a subprocess on a free loopback port.

`served` is session-scoped (one server for all service test files, started once). Tests that kill or throttle a
server start their own with `ServerProcess`. Import the fixtures into a test module with
`from tests.service_fixtures import served  # noqa: F401`.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
API_KEY = "test-key"
MAX_BODY_BYTES = 65536
MAX_MODEL_LEN = 512
STARTUP_TIMEOUT_S = 120.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """One `staticmoe serve` subprocess. Flags go on the command line; `env` adds STATICMOE_* variables. `entry`
    replaces `-m service serve` (e.g. `-c SCRIPT`, which gets `--port N` as its arguments)."""

    def __init__(self, args: list[str] = (), env: dict[str, str] | None = None, api_key: str | None = None,
                 entry: list[str] = ("-m", "service", "serve")):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        self.log = tempfile.NamedTemporaryFile("w+", prefix="staticmoe-serve-", suffix=".log", delete=False)
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("STATICMOE_")}
        full_env.update(env or {})
        full_env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
        full_env.setdefault("OMP_NUM_THREADS", "1")  # CI has 2 cores: one for the server, one for the clients
        command = [sys.executable, *entry, "--port", str(self.port), *args]
        self.proc = subprocess.Popen(command, cwd=REPO_ROOT, env=full_env, stdout=self.log, stderr=subprocess.STDOUT)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def wait_healthy(self, timeout: float = STARTUP_TIMEOUT_S) -> "ServerProcess":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_text()}")
            try:
                if httpx.get(self.base_url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"server not healthy after {timeout:.0f} s:\n{self.log_text()}")

    def log_text(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")[-6000:]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()
        return self.proc.returncode

    def metrics_text(self) -> str:
        return httpx.get(self.base_url + "/metrics", timeout=10).text


@pytest.fixture(scope="session")
def served():
    """The shared server: tiny model, API key from the environment (STATICMOE_API_KEY), 64 running sequences."""
    server = ServerProcess(
        ["--max-num-seqs", "64", "--max-queue", "64", "--max-model-len", str(MAX_MODEL_LEN),
         "--max-body-bytes", str(MAX_BODY_BYTES)],
        env={"STATICMOE_API_KEY": API_KEY}, api_key=API_KEY)
    try:
        yield server.wait_healthy()
    finally:
        server.stop()


# ---- reading /metrics --------------------------------------------------------------------------------------------
_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> dict[tuple[str, frozenset], float]:
    """{(sample name, frozenset of (label, value)): value} from the Prometheus text format."""
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if match:
            name, labels, value = match.groups()
            samples[(name, frozenset(_LABEL.findall(labels or "")))] = float(value)
    return samples


def metric(samples: dict, name: str, **labels) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    wanted = {(k, str(v)) for k, v in labels.items()}
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def wait_for(predicate, timeout: float = 20.0, interval: float = 0.1):
    """Poll until predicate() returns a truthy value; return it (or raise after `timeout`)."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s (last value {last!r})")


class InProcessServer:
    """uvicorn serving `app` on a background thread of this process (for tests that drive the engine client)."""

    def __init__(self, app):
        import threading

        import uvicorn

        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "InProcessServer":
        self.thread.start()
        wait_for(lambda: self.server.started, timeout=30)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)

"""`staticmoe serve` refuses a bad flag or model before it serves: one line naming the flag, a non-zero exit, no
traceback, never a server that becomes ready and then fails (each case was found doing one of those). Real
processes of `python -m service serve` on the embedded `tiny` model, port 8129."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
CLI_PORT = 8129  # servers that are expected to refuse to start


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STATICMOE_")}
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra or {})
    return env


def run_serve(args: list[str], env: dict[str, str] | None = None, port: int = CLI_PORT,
              timeout: float = 40.0) -> tuple[int | None, str, bool]:
    """Start `python -m service serve --port PORT ARGS`; wait until it exits or answers /health 200.
    Returns (exit status or None if it was still running and became healthy, its output, healthy)."""
    proc = subprocess.Popen([sys.executable, "-m", "service", "serve", "--port", str(port), *args], cwd=REPO_ROOT,
                            env=_env(env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    healthy = False
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    healthy = True
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            code = None
        else:
            code = proc.returncode
    return code, proc.stdout.read(), healthy


def assert_clean_refusal(code, output: str, healthy: bool, flag: str) -> None:
    """A bad flag: the server never becomes ready, exits non-zero with a one-line `staticmoe...error` naming the
    flag, and prints no Python traceback."""
    assert not healthy, f"server started and became healthy despite a bad {flag}:\n{output[-1500:]}"
    assert code not in (None, 0), f"exit status {code}:\n{output[-1500:]}"
    assert code > 0, f"killed by signal {-code} instead of an error message:\n{output[-1500:]}"
    assert "Traceback" not in output, f"traceback instead of a one-line error:\n{output[-3000:]}"
    error_lines = [line for line in output.splitlines() if "error" in line and flag in line]
    assert error_lines, f"no error line naming {flag}:\n{output[-1500:]}"


def test_chat_template_with_a_syntax_error_is_refused_at_start_up(tmp_path):
    """Was: the server starts and every chat request gets 400 invalid_messages blaming the client's messages."""
    template = tmp_path / "broken.jinja"
    template.write_text("{% if %}broken")
    assert_clean_refusal(*run_serve(["--chat-template", str(template)]), "--chat-template")


def test_chat_template_that_is_not_utf8_gives_a_one_line_error(tmp_path):
    """Was: UnicodeDecodeError traceback (read_chat_template catches OSError only)."""
    template = tmp_path / "binary.jinja"
    template.write_bytes(b"\xff\xfe\x00bad")
    assert_clean_refusal(*run_serve(["--chat-template", str(template)]), "--chat-template")


def test_bad_log_level_from_the_environment_gives_a_one_line_error():
    """Was: `ValueError: Unknown level: 'VERBOSE'` traceback (argparse never checks `choices` on a default)."""
    code, output, healthy = run_serve([], env={"STATICMOE_LOG_LEVEL": "verbose"})
    assert_clean_refusal(code, output, healthy, "STATICMOE_LOG_LEVEL")


def test_absurd_cpu_thread_count_is_refused_not_a_crash():
    """Was: SIGSEGV (exit -11) after the model starts loading (20000: `libgomp: Thread creation failed`)."""
    assert_clean_refusal(*run_serve(["--cpu-threads", "100000"]), "--cpu-threads")


@pytest.mark.parametrize("value", ["-5", "nan"])
def test_nonsense_moe_peak_flops_is_refused(value):
    """Was: accepted; staticmoe_moe_peak_flops exports it and the utilization gauge goes negative (-2.6e7 for
    -5 on the CPU) or reads 1.0 for nan."""
    assert_clean_refusal(*run_serve(["--moe-peak-flops", value]), "--moe-peak-flops")


def test_max_model_len_beyond_the_model_is_refused_before_loading():
    """Was: the port opens, the weights load, then a ModelRunner traceback and exit 1 (for a real checkpoint
    only after the whole weight load)."""
    assert_clean_refusal(*run_serve(["--max-model-len", "100000"]), "--max-model-len")


def test_model_directory_without_config_is_refused_before_serving(tmp_path):
    """Was: the port opens, then `model.config.ConfigError: no config.json` traceback, exit 1."""
    assert_clean_refusal(*run_serve(["--model", str(tmp_path)]), "--model")


def test_collective_timeout_error_names_the_flag():
    """Was: `staticmoe: error: timeouts must be positive` (which flag?)."""
    assert_clean_refusal(*run_serve(["--tensor-parallel", "1", "--collective-timeout", "-1"]), "--collective-timeout")


def test_allowed_hosts_with_no_names_is_refused():
    """Was: `--allowed-hosts ,` silently becomes the default list (ServiceSettings' own 'allowed_hosts is empty'
    check is bypassed by `args.allowed_hosts or default`)."""
    assert_clean_refusal(*run_serve(["--allowed-hosts", ","]), "allowed")


def test_tensor_parallel_that_does_not_divide_the_heads_is_refused_before_serving():
    """Was: the port opens and /health answers while the ranks start, then each rank fails building its layout
    (the tiny model has 4 attention heads: 3 ranks cannot share them)."""
    code, output, healthy = run_serve(["--tensor-parallel", "3"])
    assert_clean_refusal(code, output, healthy, "--tensor-parallel")
    assert "num_attention_heads" in output, output

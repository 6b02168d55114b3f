"""`staticmoe` CLI: flags, their STATICMOE_* environment variables, model selection, the bench dispatch, and a
server configured only through the environment."""

import os
import re
import subprocess
import sys
import types

import httpx
import pytest

pytest.register_assert_rewrite("tests.service_fixtures")
from service import cli  # noqa: E402
from tests.cli_fixtures import clean_env, parse  # noqa: E402, F401 (clean_env: autouse here)
from tests.service_fixtures import REPO_ROOT, ServerProcess  # noqa: E402

pytest_plugins = ["tests.service_fixtures"]


def test_defaults_serve_tiny_on_loopback():
    from model.engine import EngineConfig

    args = parse()
    assert (args.host, args.port, args.api_key, args.max_queue) == ("127.0.0.1", 8000, None, 1024)
    assert (args.enforce_eager, args.max_body_bytes) == (False, 1 << 20)
    assert cli.resolve_model(args) == ("tiny", False, "tiny")
    assert cli.expert_metrics_mode(args) == "auto"
    assert cli.build_engine_config(args) == EngineConfig(model="tiny")  # every engine default is the engine's
    given = cli.build_engine_config(parse("--max-num-seqs", "3", "--block-size", "8", "--dtype", "float32"))
    assert (given.max_num_seqs, given.block_size, given.dtype) == (3, 8, "float32")
    assert EngineConfig().enable_prefix_caching and not args.no_prefix_caching
    assert cli.build_engine_config(parse("--no-prefix-caching")) == EngineConfig(model="tiny",
                                                                                  enable_prefix_caching=False)
    assert EngineConfig().prefill_hold_steps == 0  # admitted at once unless asked
    assert cli.build_engine_config(parse("--prefill-hold-steps", "8")).prefill_hold_steps == 8


def test_piecewise_graphs_are_on_unless_the_flag_or_its_variable_turns_them_off(monkeypatch):
    assert cli.build_engine_config(parse()).piecewise_graphs is True
    assert cli.build_engine_config(parse("--no-piecewise-graphs")).piecewise_graphs is False
    monkeypatch.setenv("STATICMOE_NO_PIECEWISE_GRAPHS", "yes")
    assert cli.build_engine_config(parse()).piecewise_graphs is False


def test_the_old_opt_in_variable_is_named_in_a_warning_not_silently_dropped(monkeypatch, caplog):
    monkeypatch.setenv("STATICMOE_PIECEWISE_GRAPHS", "0")
    assert cli.build_engine_config(parse()).piecewise_graphs is True
    assert "STATICMOE_PIECEWISE_GRAPHS is not read any more" in caplog.text
    assert "--no-piecewise-graphs" in caplog.text


def test_chunk_budget_defaults_to_the_device_and_a_given_value_wins(monkeypatch):
    import torch

    from model.engine.config import CPU_BATCHED_TOKENS, CUDA_BATCHED_TOKENS

    def budget(*argv):
        return cli.build_engine_config(parse(*argv)).max_num_batched_tokens

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert budget() == CPU_BATCHED_TOKENS == 2048
    assert budget("--device", "cuda:1") == CUDA_BATCHED_TOKENS == 8192
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert budget() == 8192
    assert budget("--device", "cpu") == 2048
    assert budget("--max-num-batched-tokens", "300", "--device", "cuda") == 300
    with pytest.raises(SystemExit):
        parse("--max-num-batched-tokens", "0")


def test_every_serve_flag_names_its_environment_variable():
    serve = cli.build_parser()._subparsers._group_actions[0].choices["serve"]
    flags = [a for a in serve._actions if a.option_strings and a.dest != "help"]
    assert len(flags) >= 20
    for action in flags:
        long_flag = next(o for o in action.option_strings if o.startswith("--"))  # the first: aliases follow it
        expected = "STATICMOE_" + long_flag[2:].replace("-", "_").upper()
        assert f"[env {expected}]" in action.help, long_flag


def test_environment_sets_defaults_and_the_command_line_wins(monkeypatch):
    monkeypatch.setenv("STATICMOE_PORT", "9123")
    monkeypatch.setenv("STATICMOE_API_KEY", "from-env")
    monkeypatch.setenv("STATICMOE_MAX_QUEUE", "7")
    monkeypatch.setenv("STATICMOE_ENFORCE_EAGER", "yes")
    monkeypatch.setenv("STATICMOE_DTYPE", "float32")
    monkeypatch.setenv("STATICMOE_PRESET", "olmoe-1b-7b")
    monkeypatch.setenv("STATICMOE_RANDOM_WEIGHTS", "1")
    args = parse("--port", "9999")
    assert (args.port, args.api_key, args.max_queue, args.enforce_eager, args.dtype) == \
        (9999, "from-env", 7, True, "float32")
    assert cli.resolve_model(args) == ("olmoe-1b-7b", True, "olmoe-1b-7b")


@pytest.mark.parametrize("name,value", [("STATICMOE_PORT", "eighty"), ("STATICMOE_MAX_QUEUE", "-1"),
                                        ("STATICMOE_ENFORCE_EAGER", "maybe"), ("STATICMOE_MAX_NUM_SEQS", "0")])
def test_bad_environment_values_are_refused(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exit_info:
        parse()
    assert name in str(exit_info.value)


@pytest.mark.parametrize("argv", [["--port", "70000"], ["--max-queue", "-3"], ["--dtype", "int8"],
                                  ["--max-body-bytes", "0"], ["--unknown-flag"]])
def test_bad_flags_exit_with_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse(*argv)
    assert exit_info.value.code == 2


def test_an_out_of_range_flag_says_its_range(capsys):
    """The shared number types (service/arg_types.py) give argparse their message, not a bare "invalid value"."""
    with pytest.raises(SystemExit):
        parse("--max-num-seqs", "0")
    assert "argument --max-num-seqs: must be >= 1, got 0" in capsys.readouterr().err


def test_model_selection_rules(tmp_path):
    with pytest.raises(SystemExit, match="--random-weights"):
        cli.resolve_model(parse("--preset", "mixtral-8x7b"))
    with pytest.raises(SystemExit, match="not both"):
        cli.resolve_model(parse("--preset", "tiny", "--model", str(tmp_path)))
    with pytest.raises(SystemExit, match="not a directory"):
        cli.resolve_model(parse("--model", str(tmp_path / "missing")))
    assert cli.resolve_model(parse("--model", str(tmp_path))) == (str(tmp_path), False, str(tmp_path))
    assert cli.resolve_model(parse("--preset", "tiny", "--served-model-name", "t")) == ("tiny", False, "t")
    with pytest.raises(SystemExit, match="contradict"):
        cli.expert_metrics_mode(parse("--expert-metrics", "--no-expert-metrics"))
    assert cli.expert_metrics_mode(parse("--no-expert-metrics")) == "off"
    assert cli.expert_metrics_mode(parse("--expert-metrics")) == "on"


def test_bench_serve_hands_its_arguments_to_the_load_generator(monkeypatch):
    calls = []
    loadgen = types.ModuleType("service.loadgen.main")  # the module `staticmoe bench` imports
    loadgen.main = lambda argv: calls.append(argv) or 0
    monkeypatch.setitem(sys.modules, "service.loadgen.main", loadgen)
    assert cli.main(["bench", "serve", "--concurrency", "8", "--url", "http://x"]) == 0
    assert calls == [["--concurrency", "8", "--url", "http://x"]]


def test_version_prints_the_distribution_version():
    result = subprocess.run([sys.executable, "-m", "service", "--version"], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    version = re.search(r'^version = "(.+)"', (REPO_ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert result.stdout.strip() == f"staticmoe {version}"


def test_cpu_threads_default_to_half_the_cpus_of_a_cpu_engine(monkeypatch):
    import torch

    from service.cpu_threads import set_cpu_threads

    before = torch.get_num_threads()
    cpus = len(os.sched_getaffinity(0))
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        set_cpu_threads(None, torch.device("cpu"))
        assert torch.get_num_threads() == max(1, cpus // 2)
        set_cpu_threads(1, torch.device("cpu"))
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)
        set_cpu_threads(None, torch.device("cuda", 0))  # a GPU engine keeps torch's choice
        set_cpu_threads(0, torch.device("cpu"))  # 0: torch's choice
        assert torch.get_num_threads() == 2
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        set_cpu_threads(None, torch.device("cpu"))  # the environment's choice wins
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert parse("--cpu-threads", "3").cpu_threads == 3 and parse().cpu_threads is None
    with pytest.raises(SystemExit):
        parse("--cpu-threads", "-1")


def test_help_runs_as_a_module():
    result = subprocess.run([sys.executable, "-m", "service", "serve", "--help"], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert "--max-body-bytes" in result.stdout and "STATICMOE_API_KEY" in result.stdout


def test_start_up_log_names_model_device_and_kernel_path(served):
    log = served.log_text()
    assert "torch CPU threads: 1" in log  # OMP_NUM_THREADS=1 (tests/service_fixtures.py)
    assert "model tiny loaded" in log
    assert "device=cpu" in log
    assert "kernel path: pure-torch reference" in log


def test_server_configured_only_through_the_environment():
    server = ServerProcess(env={"STATICMOE_SERVED_MODEL_NAME": "my-moe", "STATICMOE_MAX_BODY_BYTES": "300",
                                "STATICMOE_NO_EXPERT_METRICS": "1", "STATICMOE_API_KEY": "env-key",
                                "STATICMOE_MAX_MODEL_LEN": "64"}, api_key="env-key")
    try:
        server.wait_healthy()
        http = httpx.Client(base_url=server.base_url, headers=server.headers, timeout=30)
        assert [m["id"] for m in http.get("/v1/models").json()["data"]] == ["my-moe"]
        assert http.get("/v1/models").json()["data"][0]["max_model_len"] == 64
        assert httpx.get(server.base_url + "/v1/models").status_code == 401
        ok = http.post("/v1/completions", json={"model": "my-moe", "prompt": "a", "max_tokens": 2})
        assert ok.status_code == 200, ok.text
        assert http.post("/v1/completions", json={"prompt": "a" * 400}).status_code == 413
        metrics = httpx.get(server.base_url + "/metrics").text
        assert "staticmoe_expert_tokens_total" not in metrics and "staticmoe_expert_idle" not in metrics
        assert "staticmoe_moe_flops_total" in metrics
    finally:
        server.stop()


def test_a_bad_config_is_refused_before_serving_and_a_failed_load_ends_the_process(tmp_path):
    """config.json is read before the port opens (one line naming the flag, no traceback); a checkpoint whose
    config and tokenizer pass but whose weights are missing fails in the background load, and the process ends."""
    from tests.model_fixtures import hf_config, make_tokenizer_files

    (tmp_path / "config.json").write_text('{"model_type": "not-a-moe"}')
    server = ServerProcess(["--model", str(tmp_path)])
    try:
        assert server.proc.wait(120) == 1
        log = server.log_text()
        assert "staticmoe: error: --model" in log and "not-a-moe" in log and "Traceback" not in log
    finally:
        server.stop()
    hf_config("qwen3_moe").save_pretrained(tmp_path)
    make_tokenizer_files(tmp_path)
    server = ServerProcess(["--model", str(tmp_path)])
    try:
        assert server.proc.wait(120) == 1
        log = server.log_text()
        assert "failed to load" in log and "safetensors" in log
    finally:
        server.stop()

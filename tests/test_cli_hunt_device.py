"""`staticmoe serve --device` / `--tensor-parallel` against the devices this machine has: a device the engine cannot
run on is refused with one line naming the flag before the port opens (each case below was accepted, the port
opened, and the background load died with a traceback)."""

from __future__ import annotations

import pytest

from service import cli
from tests.cli_fixtures import clean_env, parse  # noqa: F401 (clean_env: autouse here)
from tests.test_cli_refusals import assert_clean_refusal, run_serve


@pytest.mark.parametrize("device", ["meta", "xpu", "mps", "cpu:x"])
def test_a_device_the_engine_does_not_run_on_is_a_usage_error(device, capsys):
    """Was: accepted (torch.device parses it); the load then failed with `META device type not an accelerator` or
    `Torch not compiled with XPU enabled` after the port had opened."""
    with pytest.raises(SystemExit) as exit_info:
        parse("--device", device)
    assert exit_info.value.code == 2
    assert "--device" in capsys.readouterr().err


def test_the_device_variable_is_checked_too(monkeypatch):
    monkeypatch.setenv("STATICMOE_DEVICE", "meta")
    with pytest.raises(SystemExit, match="STATICMOE_DEVICE"):
        parse()


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:3"])
def test_the_documented_devices_parse(device):
    assert parse("--device", device).device == device


def test_engine_config_refuses_other_device_types_too():
    from model.engine import EngineConfig

    with pytest.raises(ValueError, match="meta"):
        EngineConfig(device="meta")


def test_meta_device_is_refused_before_the_server_starts():
    assert_clean_refusal(*run_serve(["--device", "meta"]), "--device")


def test_more_tensor_parallel_ranks_than_gpus_is_refused_in_preflight(monkeypatch):
    """Was: checked only by the background load (model/parallel/launcher.py), after the port opened: /health
    answered 503 and the process died with a traceback."""
    import torch

    from model.engine.config import EngineConfig

    args = parse("--tensor-parallel", "4", "--device", "cuda")
    parallel = cli.parallel_config(args)
    engine_config = cli.build_engine_config(args)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(EngineConfig, "resolve_device", lambda self: torch.device("cuda", 0))
    with pytest.raises(SystemExit, match=r"--tensor-parallel 4.*2 GPU"):
        cli.preflight(args, engine_config, "tiny", False, parallel)


@pytest.mark.parametrize("value", ["inf", "1e300"])
def test_collective_timeout_beyond_what_a_timeout_can_hold_is_refused(value):
    """Was: accepted; the load then died with `OverflowError: cannot convert float infinity to integer` building
    the process groups' timedelta."""
    with pytest.raises(SystemExit, match="--collective-timeout"):
        cli.parallel_config(parse("--tensor-parallel", "1", "--collective-timeout", value))

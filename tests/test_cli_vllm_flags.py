"""vLLM command-line names an operator brings along: `--tensor-parallel-size` (our `--tensor-parallel`) and
`--gpu-memory-utilization` (EngineConfig had the setting, no flag). Both were `unrecognized arguments` (exit 2)."""

from __future__ import annotations

import pytest

from service import cli
from tests.cli_fixtures import clean_env, parse  # noqa: F401 (clean_env: autouse here)


def test_tensor_parallel_size_is_tensor_parallel():
    assert parse("--tensor-parallel-size", "2").tensor_parallel == 2
    assert parse("--tensor-parallel", "4").tensor_parallel == 4


def test_gpu_memory_utilization_flag_and_variable_reach_the_engine_config(monkeypatch):
    from model.engine import EngineConfig

    assert cli.build_engine_config(parse()).gpu_memory_utilization == EngineConfig().gpu_memory_utilization
    assert cli.build_engine_config(parse("--gpu-memory-utilization", "0.5")).gpu_memory_utilization == 0.5
    monkeypatch.setenv("STATICMOE_GPU_MEMORY_UTILIZATION", "0.7")
    assert cli.build_engine_config(parse()).gpu_memory_utilization == 0.7
    assert cli.build_engine_config(parse("--gpu-memory-utilization", "0.6")).gpu_memory_utilization == 0.6


@pytest.mark.parametrize("value", ["0", "1.5", "-0.2", "nan", "x"])
def test_a_memory_fraction_outside_the_engines_range_is_a_usage_error(value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse("--gpu-memory-utilization", value)
    assert exit_info.value.code == 2 and "--gpu-memory-utilization" in capsys.readouterr().err

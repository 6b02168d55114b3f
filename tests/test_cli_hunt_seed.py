"""`staticmoe serve --seed N`, as vLLM's: seeds the random stream of sampled requests that bring no seed of their
own. Was: `unrecognized arguments: --seed` (exit 2) for an operator's vLLM command line, though EngineConfig.seed
exists; every server sampled the same stream."""

from __future__ import annotations

import pytest

from model.engine import LLMEngine, SamplingParams
from service import cli
from tests.cli_fixtures import clean_env, parse  # noqa: F401 (clean_env: autouse here)


def test_seed_flag_and_variable_reach_the_engine_config(monkeypatch):
    from model.engine import EngineConfig

    assert cli.build_engine_config(parse()).seed == EngineConfig().seed
    assert cli.build_engine_config(parse("--seed", "1234")).seed == 1234
    monkeypatch.setenv("STATICMOE_SEED", "99")
    assert cli.build_engine_config(parse()).seed == 99
    assert cli.build_engine_config(parse("--seed", "5")).seed == 5


@pytest.mark.parametrize("value", ["-1", "x", str(2**64), "1.5"])
def test_a_seed_torch_cannot_take_is_a_usage_error(value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse("--seed", value)
    assert exit_info.value.code == 2 and "--seed" in capsys.readouterr().err


def test_engine_config_refuses_an_out_of_range_seed():
    from model.engine import EngineConfig

    for bad in (-1, 2**64, 1.0, True):
        with pytest.raises(ValueError, match="seed"):
            EngineConfig(seed=bad)


def _unseeded_sample(seed: int) -> list[int]:
    engine = LLMEngine(cli.build_engine_config(parse("--seed", str(seed), "--max-num-seqs", "2",
                                                     "--max-num-batched-tokens", "64", "--device", "cpu")))
    engine.add_request("r", list(b"hello"), SamplingParams(temperature=1.0, max_tokens=24, ignore_eos=True))
    tokens = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens += out.new_token_ids
    return tokens


def test_the_seed_is_honoured_by_unseeded_sampling():
    first = _unseeded_sample(7)
    assert _unseeded_sample(7) == first
    assert _unseeded_sample(8) != first

"""`staticmoe serve` model selection and KV-cache sizing that cannot work: refused before the port opens, with one
line naming the flag (each case below was accepted or blamed on another flag)."""

from __future__ import annotations

import pytest

from model.presets import PRESETS
from service import cli
from tests.cli_fixtures import clean_env, parse  # noqa: F401 (clean_env: autouse here)
from tests.test_cli_refusals import assert_clean_refusal, run_serve


@pytest.mark.parametrize("argv", [["--preset", "qwen3-30b"], ["--preset", "TINY"],
                                  ["--preset", "qwen3-30b", "--random-weights"]])
def test_an_unknown_preset_is_named_and_the_presets_listed(argv):
    """Was: `--preset qwen3-30b has no weights here; add --random-weights` (and with it added, a second error)."""
    with pytest.raises(SystemExit) as exit_info:
        cli.resolve_model(parse(*argv))
    message = str(exit_info.value)
    assert "--preset" in message and "unknown" in message and "--random-weights" not in message, message
    assert all(name in message for name in PRESETS), message


def test_a_directory_passed_as_a_preset_is_not_loaded_as_a_checkpoint(tmp_path):
    """Was: `--preset DIR --random-weights` read DIR/config.json (resolve_source takes any directory)."""
    with pytest.raises(SystemExit, match="unknown"):
        cli.resolve_model(parse("--preset", str(tmp_path), "--random-weights"))


def test_known_presets_still_resolve():
    assert cli.resolve_model(parse("--preset", "olmoe-1b-7b", "--random-weights"))[:2] == ("olmoe-1b-7b", True)
    assert cli.resolve_model(parse())[0] == "tiny"


def test_kv_blocks_too_few_for_one_max_length_request_are_refused_before_serving():
    """Was: the port opened, then the background load failed with a ModelRunner traceback (`max_model_len=4096
    does not fit the KV cache`) and exit 1. The tiny model's 4096 tokens need 256 blocks of 16."""
    code, output, healthy = run_serve(["--num-kv-blocks", "255", "--max-model-len", "4096"])
    assert_clean_refusal(code, output, healthy, "--num-kv-blocks")
    assert "--max-model-len" in output, output


def test_kv_blocks_that_just_fit_pass_preflight():
    args = parse("--num-kv-blocks", "256", "--max-model-len", "4096")
    cli.preflight(args, cli.build_engine_config(args), "tiny", False)
    args = parse("--num-kv-blocks", "32", "--block-size", "8", "--max-model-len", "256")
    cli.preflight(args, cli.build_engine_config(args), "tiny", False)
    args = parse("--num-kv-blocks", "31", "--block-size", "8", "--max-model-len", "256")
    with pytest.raises(SystemExit, match="--num-kv-blocks 31"):
        cli.preflight(args, cli.build_engine_config(args), "tiny", False)

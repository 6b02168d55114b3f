"""KV capacity edge cases at the engine's boundary. A pool too small for any request (a gpt-oss model with two
KV-cache groups needs one block per group for its first token, so num_kv_blocks=1 holds none) built an engine
with max_model_len 0 that rejected every request; it now fails at construction with a clear error. A request that
could never fit is refused at add_request, and one that fits exactly runs to its end (no hang)."""

import pytest

from model.engine import EngineConfig, LLMEngine, SamplingParams
from tests.engine_fixtures import GREEDY, one_cpu_thread, run, tokens_of  # noqa: F401
from tests.model_fixtures import make_hf_model, save_checkpoint


@pytest.fixture(scope="module")
def gpt_oss_dir(tmp_path_factory):
    return save_checkpoint(make_hf_model("gpt_oss", seed=3, sliding_window=8), tmp_path_factory.mktemp("gpt_oss"))


def engine(directory, num_kv_blocks: int) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(directory), dtype="float32", block_size=4, num_kv_blocks=num_kv_blocks,
                                  max_num_seqs=2, max_num_batched_tokens=8))


def test_a_pool_that_holds_no_request_is_refused_at_construction(gpt_oss_dir):
    with pytest.raises(ValueError, match="num_kv_blocks"):
        engine(gpt_oss_dir, 1)


def test_the_smallest_pool_that_holds_a_request_serves_it_and_refuses_a_longer_one(gpt_oss_dir):
    e = engine(gpt_oss_dir, 2)  # one block per group: 4 tokens
    assert e.max_model_len == 4
    with pytest.raises(ValueError, match="max_model_len=4"):
        e.add_request("long", [1, 2, 3, 4], SamplingParams(max_tokens=1))
    outputs = run(e, {"a": ([1, 2, 3], SamplingParams(max_tokens=1, **GREEDY)),
                      "b": ([5, 6], SamplingParams(max_tokens=2, **GREEDY))}, max_steps=40)
    assert len(tokens_of(outputs["a"])) == 1 and len(tokens_of(outputs["b"])) == 2
    assert e.block_manager.num_free_blocks == 2


def test_a_max_model_len_that_holds_no_request_is_refused():
    with pytest.raises(ValueError, match="max_model_len"):
        LLMEngine(EngineConfig(model="tiny", max_model_len=1))

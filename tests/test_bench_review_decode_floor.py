"""benchmarks/bench_engine.py's decode byte floor, checked against hand-computed values: the experts a decode step
of batch B is expected to touch (not all experts), with and without the engine's measured per-expert load."""

import pytest

from benchmarks.bench_engine import decode_floor, expected_experts_touched
from model.engine import EngineConfig, LLMEngine, SamplingParams
from tests.engine_fixtures import one_cpu_thread  # noqa: F401


def test_uniform_load_by_hand():
    # E = 64, k = 8: one token touches 8; four tokens 64·(1 − (7/8)^4) = 26.484...
    assert expected_experts_touched([5] * 64, top_k=8, batch=1) == pytest.approx(8.0)
    assert expected_experts_touched([5] * 64, top_k=8, batch=4) == pytest.approx(64 * (1 - (7 / 8) ** 4))


def test_skewed_load_by_hand():
    # two experts, k = 1, shares 3/4 and 1/4: two tokens miss expert 0 with (1/4)^2, expert 1 with (3/4)^2
    assert expected_experts_touched([3, 1], top_k=1, batch=2) == pytest.approx((1 - 1 / 16) + (1 - 9 / 16))


def test_no_measured_load_assumes_uniform_routing_not_every_expert():
    """No load counted (expert metrics off, or nothing served yet): one decode token still reads k experts, not E.
    Assuming all E would put the batch-1 floor E/k times too high on its expert bytes."""
    assert expected_experts_touched([0] * 128, top_k=8, batch=1) == pytest.approx(8.0)
    assert expected_experts_touched([0] * 8, top_k=2, batch=3) == pytest.approx(8 * (1 - (6 / 8) ** 3))


@pytest.mark.parametrize("metrics", [True, False])
def test_decode_floor_counts_k_experts_per_layer_at_batch_1(metrics):
    engine = LLMEngine(EngineConfig(model="tiny", max_num_seqs=2, max_num_batched_tokens=64, expert_metrics=metrics))
    engine.add_request("r", [5, 6, 7, 8], SamplingParams(max_tokens=4, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    blocks = engine.model.moe_blocks()
    per_expert = [sum(p.numel() * p.element_size() for p in b.experts.parameters()) / b.num_experts for b in blocks]
    floor = decode_floor(engine, batch=1, context_len=8, bandwidth=1e9)
    want = sum(b.top_k * e for b, e in zip(blocks, per_expert))  # tiny: k = 2 of E = 8 per layer
    # at batch 1, sum over e of k·p_e = k whatever the measured shares p_e are
    assert floor["bytes_experts"] == pytest.approx(want)


def test_tied_embeddings_count_the_whole_lm_head(monkeypatch):
    """With tie_word_embeddings the lm_head is the embedding matrix: a decode step reads all V×H of it for the
    logits, not only the batch's rows (named_parameters lists the shared tensor once, under the embedding's name)."""
    from model.presets import PRESETS

    monkeypatch.setitem(PRESETS, "tiny-tied", dict(PRESETS["tiny"], tie_word_embeddings=True))
    tied = LLMEngine(EngineConfig(model="tiny-tied", random_weights=True, max_num_seqs=2, max_num_batched_tokens=64))
    untied = LLMEngine(EngineConfig(model="tiny", random_weights=True, max_num_seqs=2, max_num_batched_tokens=64))
    V, H = PRESETS["tiny"]["vocab_size"], PRESETS["tiny"]["hidden_size"]
    elem = tied.model.head_weight().element_size()
    dense_tied = decode_floor(tied, batch=1, context_len=8, bandwidth=1e9)["bytes_dense"]
    dense_untied = decode_floor(untied, batch=1, context_len=8, bandwidth=1e9)["bytes_dense"]
    # untied: lm_head V·H plus one embedding row H; tied: the one matrix, read whole for the logits
    assert dense_untied - dense_tied == pytest.approx(H * elem)
    assert dense_tied >= V * H * elem

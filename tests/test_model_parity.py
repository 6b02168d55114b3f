"""Parity with HF transformers: a tiny random model of each family (DeepSeek's variants included), built and saved by
transformers, loaded by our loader, must give the same logits (float32, within 1e-4 relative) and the same greedy
continuation as `generate`."""

import copy

import pytest
import torch

from model.loader import load_model
from tests.deepseek_fixtures import TINY_DEEPSEEK, make_deepseek_model
from tests.model_fixtures import (
    PARITY_FAMILIES, PagedRunner, assert_bf16_close, hf_greedy, hf_logits, make_hf_model, max_relative_error, save_checkpoint,
)

PROMPT = [5, 77, 203, 19, 150, 8, 66, 301, 42, 42, 7, 260, 99]


# DeepSeek builds its tiny models with its own fixture (tests/deepseek_fixtures.py): one entry per variant
DEEPSEEK = [f"deepseek-{variant}" for variant in TINY_DEEPSEEK]


@pytest.fixture(scope="module", params=[*PARITY_FAMILIES, *DEEPSEEK])
def pair(request, tmp_path_factory):
    """(HF model, our model) of one family, ours loaded from the checkpoint HF saved."""
    if request.param in DEEPSEEK:
        hf = make_deepseek_model(request.param.removeprefix("deepseek-"), seed=DEEPSEEK.index(request.param))
    else:
        hf = make_hf_model(request.param, seed=list(PARITY_FAMILIES).index(request.param))
    directory = save_checkpoint(hf, tmp_path_factory.mktemp(request.param))
    ours, _ = load_model(str(directory), dtype=torch.float32)
    return hf, ours, directory


def test_prefill_logits_match_hf(pair):
    hf, ours, _ = pair
    expected = hf_logits(hf, PROMPT)  # [n, V]
    actual = PagedRunner(ours).step({"s": PROMPT}, all_logits=True)["s"]
    assert actual.shape == expected.shape
    assert max_relative_error(actual, expected) < 1e-4


def test_chunked_prefill_and_decode_logits_match_hf(pair):
    """Prefill in chunks of 5 (attention over cached blocks), then decode steps: every position's logits."""
    hf, ours, _ = pair
    expected = hf_logits(hf, PROMPT)
    runner = PagedRunner(ours, seed=3)
    rows = [runner.step({"s": PROMPT[i : i + 5]}, all_logits=True)["s"] for i in range(0, 10, 5)]
    rows += [runner.step({"s": [token]})["s"] for token in PROMPT[10:]]
    assert max_relative_error(torch.cat(rows), expected) < 1e-4


def test_greedy_32_tokens_identical_to_generate(pair):
    hf, ours, _ = pair
    expected = hf_greedy(hf, PROMPT, 32)
    assert PagedRunner(ours).greedy(PROMPT, 32) == expected
    assert PagedRunner(ours, seed=1).greedy(PROMPT, 32, chunk=4) == expected


def test_batch_of_sequences_with_padding_matches_each_alone(pair):
    """Three sequences prefilled together (one continuing a cached prefix), then decoded together in a batch padded
    to 5 rows (slot -1): each sequence's logits equal HF's for that sequence alone."""
    hf, ours, _ = pair
    prompts = {"a": PROMPT, "b": PROMPT[3:9], "c": [11, 12]}
    runner = PagedRunner(ours, seed=2)
    runner.step({"a": PROMPT[:4]})
    first = runner.step({"a": PROMPT[4:], "b": prompts["b"], "c": prompts["c"]})
    nxt = {k: [int(v[-1].argmax())] for k, v in first.items()}
    second = runner.step(nxt, pad_to=5)
    for key, prompt in prompts.items():
        expected = hf_logits(hf, prompt + nxt[key])
        assert max_relative_error(first[key][-1], expected[-2]) < 1e-4
        assert max_relative_error(second[key][-1], expected[-1]) < 1e-4


def test_mixed_prefill_and_decode_batch_matches_hf(pair):
    """One step holding a decode row and a prefill chunk (the non-graph path of chunked prefill)."""
    hf, ours, _ = pair
    runner = PagedRunner(ours, seed=4)
    runner.step({"old": PROMPT[:6]})
    out = runner.step({"old": [PROMPT[6]], "new": PROMPT[:9]})
    assert max_relative_error(out["old"][-1], hf_logits(hf, PROMPT[:7])[-1]) < 1e-4
    assert max_relative_error(out["new"][-1], hf_logits(hf, PROMPT[:9])[-1]) < 1e-4


def test_mixtral_sliding_window_matches_hf(tmp_path):
    """A window shorter than the sequence, so positions really drop out of attention in prefill and decode."""
    hf = make_hf_model("mixtral", seed=7, sliding_window=6)
    ours, _ = load_model(str(save_checkpoint(hf, tmp_path)), dtype=torch.float32)
    assert ours.config.sliding_window == 6
    assert PagedRunner(ours).greedy(PROMPT, 32, chunk=5) == hf_greedy(hf, PROMPT, 32)


def test_bfloat16_error_within_transformers_own_bf16_error(pair):
    """bf16 on the CPU (reference MoE path), measured against HF's own bf16 error from the fp32 logits."""
    hf, _, directory = pair
    golden = hf_logits(hf, PROMPT)
    hf_bf16 = hf_logits(copy.deepcopy(hf).to(torch.bfloat16), PROMPT)
    ours, _ = load_model(str(directory), dtype=torch.bfloat16)
    actual = PagedRunner(ours).step({"s": PROMPT}, all_logits=True)["s"]
    assert actual.dtype == torch.float32 and next(ours.parameters()).dtype == torch.bfloat16
    assert_bf16_close(actual, hf_bf16, golden)


def test_linear_rope_scaling_matches_hf(tmp_path):
    hf = make_hf_model("qwen2_moe", seed=8, rope_parameters={"rope_type": "linear", "factor": 4.0,
                                                            "rope_theta": 500.0})
    ours, _ = load_model(str(save_checkpoint(hf, tmp_path)), dtype=torch.float32)
    assert (ours.config.rope_theta, ours.config.rope_linear_factor) == (500.0, 4.0)
    expected = hf_logits(hf, PROMPT)
    assert max_relative_error(PagedRunner(ours).step({"s": PROMPT}, all_logits=True)["s"], expected) < 1e-4
    no_scaling = make_hf_model("qwen2_moe", seed=8, rope_parameters={"rope_type": "default", "rope_theta": 500.0})
    assert max_relative_error(hf_logits(no_scaling, PROMPT), expected) > 1e-3  # the scaling really matters here

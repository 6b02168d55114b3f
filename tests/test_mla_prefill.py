"""The batched prefill of MLA chunks that start their sequence (model/layers/mla_prefill.py): one step mixing several
fresh prompts of different lengths, a chunk that continues a cached prefix and a decode row gives, in float32, the
logits of the one-chunk-at-a-time path and of transformers run on each sequence alone."""

import pytest
import torch

from model.layers import mla_prefill
from model.loader import load_model
from tests.deepseek_fixtures import make_deepseek_model
from tests.model_fixtures import PagedRunner, hf_logits, save_checkpoint

PROMPTS = {"a": [5, 77, 203, 19, 150, 8, 66, 301, 42], "b": [42, 7, 260, 99, 3, 11, 250], "c": [1, 2, 3, 4, 5, 6]}


@pytest.fixture(scope="module", params=["v2-lite", "v3-yarn"])
def models(request, tmp_path_factory):
    hf = make_deepseek_model(request.param, seed=5)
    ours, _ = load_model(str(save_checkpoint(hf, tmp_path_factory.mktemp("mla_prefill"))), dtype=torch.float32)
    return hf, ours


def mixed_steps(ours) -> dict[str, torch.Tensor]:
    """Step 1: 'd' prefills 5 tokens alone. Step 2: fresh 'a', 'b', 'c' (9, 7, 6 tokens), 'd' continues with 4 more
    (cached context) and 'e' (prefilled in step 1 too) decodes one token. Returns step 2's logits of every row."""
    runner = PagedRunner(ours, seed=1)
    runner.step({"d": [9, 8, 7, 6, 5], "e": [31, 32, 33]})
    return runner.step({**PROMPTS, "d": [4, 3, 2, 1], "e": [34]}, all_logits=True)


def test_batched_fresh_chunks_equal_one_chunk_at_a_time_and_transformers(models, monkeypatch):
    hf, ours = models
    calls = []
    original = mla_prefill.batched_fresh_prefill
    monkeypatch.setattr(mla_prefill, "batched_fresh_prefill", lambda *a, **kw: calls.append(len(a[5])) or original(*a, **kw))
    batched = mixed_steps(ours)
    assert 3 in calls, "step 2's three fresh prompts went through the batched path (step 1's two did too)"
    monkeypatch.setattr(mla_prefill, "worth_batching", lambda chunks: False)
    one_by_one = mixed_steps(ours)
    for seq, logits in batched.items():
        torch.testing.assert_close(logits, one_by_one[seq], rtol=1e-5, atol=1e-5)
    for seq, prompt in PROMPTS.items():
        torch.testing.assert_close(batched[seq], hf_logits(hf, prompt), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(batched["d"], hf_logits(hf, [9, 8, 7, 6, 5, 4, 3, 2, 1])[5:], rtol=1e-4, atol=1e-4)


def test_padding_is_bounded():
    class Chunk:
        def __init__(self, start, n, context):
            self.rows, self.context_len = slice(start, start + n), context

    same = [Chunk(0, 512, 512), Chunk(512, 512, 512)]
    skewed = [Chunk(0, 8000, 8000), Chunk(8000, 10, 10), Chunk(8010, 10, 10)]
    assert mla_prefill.fresh(same + [Chunk(1024, 5, 40)]) == same  # a chunk after a cached prefix is not fresh
    assert mla_prefill.worth_batching(same)
    assert not mla_prefill.worth_batching(skewed)  # 3 x 8000 padded for 8020 real tokens
    assert not mla_prefill.worth_batching(same[:1])  # one chunk: nothing to batch


def test_fresh_layout_by_hand():
    class Chunk:  # only the rows matter to the layout
        def __init__(self, start, stop):
            self.rows = slice(start, stop)

    # chunk 0: rows 0..2 (3 tokens), chunk 1: rows 5..6 (2 tokens; rows 3-4 belong to a decode row / another chunk)
    layout = mla_prefill.fresh_layout([Chunk(0, 3), Chunk(5, 7)], torch.device("cpu"))
    assert layout.rows.tolist() == [0, 1, 2, 5, 6]
    assert (layout.batch, layout.width) == (2, 3)
    assert layout.padded_rows.tolist() == [0, 1, 2, 5, 6, 5]  # chunk 1's padding repeats its first row (step row 5)
    assert layout.unpadded.tolist() == [0, 1, 2, 3, 4]  # [B * L] = [2 * 3]: chunk 1 starts at 3
    layout = mla_prefill.fresh_layout([Chunk(2, 4), Chunk(4, 8)], torch.device("cpu"))
    assert (layout.batch, layout.width) == (2, 4)
    assert layout.padded_rows.tolist() == [2, 3, 2, 2, 4, 5, 6, 7]
    assert layout.rows.tolist() == [2, 3, 4, 5, 6, 7]
    assert layout.unpadded.tolist() == [0, 1, 4, 5, 6, 7]

"""How many programs the decode attention kernels split a sequence's keys over, on a 132-SM GPU (H100/H200), without
one: the expected counts are the fastest measured on the H200 (benchmarks/results/bench_decode_attention_2026-12-07-
0430_h200.log) for the GQA kernel, and the counts MLA's launch configs were swept with."""

import pytest
import torch

from model.layers import triton_decode_attention as gqa
from model.layers.triton_mla_decode import mla_splits

CUDA = torch.device("cuda", 0)  # only its type and index are read


@pytest.fixture(autouse=True)
def sms_132(monkeypatch):
    monkeypatch.setattr(gqa, "_num_sms", lambda index: 132)


@pytest.mark.parametrize("batch, kv_heads, context, expected", [
    (1, 16, 8192, 32),   # olmoe: 23.9 µs with 32 against 28.3 with 16
    (4, 16, 2048, 8),    # olmoe: 23.2 against 28.0 with 4
    (4, 16, 8192, 8),    # olmoe: 68.0 against 83.9 with 4
    (64, 16, 8192, 1),   # olmoe: one program per (sequence, head) fills the GPU
    (1, 4, 8192, 64),    # qwen3
    (4, 4, 8192, 32),    # qwen3: 25.0 against 27.9 with 16
    (64, 4, 2048, 2),    # qwen3
    (64, 4, 128, 1),     # qwen3: two chunks are not split (7.8 against 10.5 µs with 2)
    (1, 16, 128, 1),     # olmoe: likewise at batch 1 (5.6 against 6.0)
    (4, 8, 2048, 16),    # gpt-oss: 9.3 against 10.6 with 8
    (1, 8, 512, 8),      # gpt-oss: one split per chunk of 64 keys
])
def test_gqa_splits_are_the_measured_best(batch, kv_heads, context, expected):
    assert gqa.choose_splits(batch, kv_heads, context, CUDA, 64) == expected


def test_no_split_off_cuda():
    assert gqa.choose_splits(1, 1, 8192, torch.device("cpu"), 64) == 1
    assert mla_splits(1, 1, 8192, torch.device("cpu"), 32) == 1


@pytest.mark.parametrize("batch, groups, context, expected", [
    (64, 1, 4096, 4),   # V2-Lite, 16 heads in one program: the swept point (1.31x floor on the H100)
    (64, 2, 4096, 2),   # V3, 128 heads in two programs of 64
    (1, 1, 4096, 64),   # batch 1: as many splits as the cap allows
    (1, 1, 64, 2),      # short context: one split per tile of 32 keys
])
def test_mla_keeps_the_rule_its_configs_were_swept_with(batch, groups, context, expected):
    assert mla_splits(batch, groups, context, CUDA, 32) == expected

"""q/k norm + rotary + K/V cache write in one launch (model/layers/triton_norm_rotary_write.py) compiled on the GPU:
the CPU test's cases, then the presets' head shapes, each against the unfused modules (a rounding may flip where the
float32 statistics are summed in another order: at most one unit in the last place, on at most 2% of the values),
and Attention.forward with and without it. CPU-side checks: tests/test_norm_rotary_write.py."""

import pytest

from tests.norm_rotary_write_checks import check, check_layer
from tests.test_norm_rotary_write import CASES

pytestmark = [pytest.mark.gpu, pytest.mark.triton_only]

# (N, Hq, Hkv, D, norm, rotary channels): Qwen3-30B-A3B, OLMoE, gpt-oss-20b, GLM-4.5-Air (partial rotary)
PRESETS = [(32, 4, 128, "per_head", 128), (16, 16, 128, "full", 128), (64, 8, 64, "none", 64),
           (96, 8, 128, "none", 64)]


@pytest.mark.parametrize("case", CASES)
def test_small_cases_of_the_cpu_test(case):
    n, hq, hkv, d, norm, r, dtype, pad = case
    check(n, hq, hkv, d, norm, r, dtype, device="cuda", pad=pad)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("n", [1, 16, 64])
def test_preset_shapes(preset, n):
    hq, hkv, d, norm, r = preset
    check(n, hq, hkv, d, norm, r, device="cuda", pad=n > 2)


@pytest.mark.parametrize("qk_norm", ["per_head", "full", "none"])
def test_layer_forward_with_and_without(qk_norm):
    check_layer(qk_norm, device="cuda")

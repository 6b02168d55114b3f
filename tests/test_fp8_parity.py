"""Block-FP8 checkpoints of each family, written by the tests (tests/fp8_fixtures.py), served by our loader and model on
the CPU, against HF transformers on the dequantised weights in float32.

The tolerance is the activation-quantisation error, measured here: HF with every FP8 GEMM's input quantised per
(token, 128 columns) (`fake_quant_hf`) against HF without (`hf_float32` of the dequantised checkpoint). Measured on
these random 2-layer nets (max |difference| / max |logit|, worst prompt position): qwen3_moe 6.4e-2, qwen2_moe
7.9e-2, mixtral 5.2e-2, olmoe 8.6e-2, glm4_moe 5.7e-2. Ours must (a) equal the W8A8 reference to float32 rounding
(1e-4, as the float32 parity tests; measured 3-4e-7), and so (b) sit within 1.1x that activation error of the
dequantised model, row by row, and at least half of it away (so activations really are quantised: a model that
skipped it would pass (b) alone).
"""

import pytest
import torch

from model.kernels.fp8 import FP8_DTYPE
from model.layers.fp8 import Fp8Experts, Fp8Linear
from model.loader import load_model
from tests.fp8_fixtures import FP8_CONFIGS, fake_quant_hf, hf_float32, write_fp8_checkpoint
from tests.model_fixtures import PagedRunner, hf_greedy, hf_logits, row_errors

PROMPT = [5, 77, 203, 19, 150, 8, 66, 301, 42, 42, 7, 260, 99]
FAMILIES = list(FP8_CONFIGS)


@pytest.fixture(scope="module", params=FAMILIES)
def case(request, tmp_path_factory):
    family = request.param
    fp8_dir, deq_dir = write_fp8_checkpoint(family, tmp_path_factory.mktemp(family), seed=FAMILIES.index(family))
    reference = hf_float32(deq_dir)
    w8a8 = fake_quant_hf(reference, family)
    ours, _ = load_model(str(fp8_dir), dtype=torch.float32)
    return dict(family=family, fp8_dir=fp8_dir, reference=reference, w8a8=w8a8, ours=ours,
                ref_logits=hf_logits(reference, PROMPT), w8a8_logits=hf_logits(w8a8, PROMPT))


def test_checkpoint_loads_as_fp8(case):
    """Every FP8 tensor of the checkpoint stays FP8 in memory, in FP8 modules; nothing else is FP8."""
    ours = case["ours"]
    fp8 = {n for n, p in ours.named_parameters() if p.dtype == FP8_DTYPE}
    assert fp8 and all(".experts." in n or n.endswith("proj.weight") or n.endswith("mlp.gate.weight") for n in fp8)
    assert all(isinstance(b.experts, Fp8Experts) for b in ours.moe_blocks())
    assert isinstance(ours.model.layers[0].self_attn.qkv_proj, Fp8Linear)
    assert ours.model.embed_tokens.weight.dtype == torch.float32 and ours.lm_head.weight.dtype == torch.float32
    router_fp8 = ours.moe_blocks()[0].gate.__class__ is Fp8Linear
    assert router_fp8 == (case["family"] == "qwen3_moe")  # only that checkpoint quantises its router (ragged block)


def test_logits_match_the_w8a8_reference(case):
    actual = PagedRunner(case["ours"]).step({"s": PROMPT}, all_logits=True)["s"]
    assert row_errors(actual, case["w8a8_logits"]).max() < 1e-4


def test_logits_within_the_measured_activation_quantisation_error(case):
    activation_error = row_errors(case["w8a8_logits"], case["ref_logits"])  # [rows]
    assert activation_error.max() > 1e-2  # the tolerance below is not vacuous
    actual = PagedRunner(case["ours"]).step({"s": PROMPT}, all_logits=True)["s"]
    ours = row_errors(actual, case["ref_logits"])
    print(f"{case['family']}: activation-quantisation error {activation_error.max():.3g} (max row), ours "
          f"{ours.max():.3g}")
    assert torch.all(ours <= 1.1 * activation_error + 1e-4), (ours, activation_error)
    assert ours.max() >= 0.5 * activation_error.max()


def test_chunked_prefill_decode_and_padded_batch(case):
    """The paged paths (prefill in chunks, decode steps, a padded decode batch) on FP8 weights."""
    runner = PagedRunner(case["ours"], seed=3)
    rows = [runner.step({"s": PROMPT[i: i + 5]}, all_logits=True)["s"] for i in range(0, 10, 5)]
    rows += [runner.step({"s": [t], "pad": [1]} if i == 0 else {"s": [t]}, pad_to=4)["s"]
             for i, t in enumerate(PROMPT[10:])]
    assert row_errors(torch.cat(rows), case["w8a8_logits"]).max() < 1e-4


def test_greedy_tokens_equal_the_w8a8_reference(case):
    assert PagedRunner(case["ours"]).greedy(PROMPT, 12) == hf_greedy(case["w8a8"], PROMPT, 12)


def test_transformers_reads_the_checkpoint_as_the_test_dequantises_it(case):
    """transformers 5.17's own fine-grained FP8 integration on the same files. On a CPU it cannot compute in FP8:
    it dequantises the weights at load (to float32 here) and runs without activation quantisation, so it must
    equal the dequantised reference, which checks that the test's writer and transformers read the format alike."""
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load FP8 checkpoints")
    import transformers

    hf8 = transformers.AutoModelForCausalLM.from_pretrained(case["fp8_dir"], dtype=torch.float32,
                                                            attn_implementation="eager").eval()
    assert row_errors(hf_logits(hf8, PROMPT), case["ref_logits"]).max() < 1e-6

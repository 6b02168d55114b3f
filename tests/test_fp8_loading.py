"""Block-FP8 checkpoints we refuse at start-up (the file and tensor named), and quantisation at load: a bf16
checkpoint or preset made FP8 by `quantization="fp8"` without a full-precision copy."""

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file

from model.checkpoint import CheckpointError
from model.config import ConfigError
from model.kernels.fp8 import FP8_DTYPE, dequantize_fp8_blocks, quantize_fp8_blocks
from model.layers.fp8 import Fp8Experts, Fp8Linear
from model.loader import load_model
from model.presets import PRESETS
from tests.fp8_fixtures import fake_quant_hf, hf_float32, write_fp8_checkpoint
from tests.model_fixtures import PagedRunner, hf_logits, rewrite_safetensors, row_errors

PROMPT = [3, 14, 15, 92, 65, 35, 89, 79, 32]
Q = "model.layers.0.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    return write_fp8_checkpoint("qwen2_moe", tmp_path_factory.mktemp("qwen2_fp8"), seed=5)


@pytest.fixture
def fp8(written, tmp_path):
    """A fresh copy of the FP8 checkpoint to break: (directory, its safetensors file)."""
    directory = shutil.copytree(written[0], tmp_path / "fp8")
    return directory, directory / "model.safetensors"


def edit_config(directory, change):
    config = json.loads((directory / "config.json").read_text())
    change(config)
    (directory / "config.json").write_text(json.dumps(config))


def test_missing_scale_names_file_and_tensor(fp8):
    directory, path = fp8
    rewrite_safetensors(path, lambda t: t.pop(Q + "_scale_inv"))
    with pytest.raises(CheckpointError, match=rf"'{Q}' in .*model.safetensors is float8_e4m3fn but .* no "
                                              rf"'{Q}_scale_inv'"):
        load_model(str(directory), dtype=torch.float32)


@pytest.mark.parametrize("bad", ["shape", "dtype"])
def test_scale_of_wrong_shape_or_dtype(fp8, bad):
    """A float scale of another dtype (bf16, f16, f64) is read as float32, as vLLM copies it
    (tests/test_loading_as_vllm_does.py); an e4m3 one is no block scale."""
    directory, path = fp8

    def change(t):
        s = t[Q + "_scale_inv"]
        t[Q + "_scale_inv"] = torch.cat([s, s]) if bad == "shape" else s.to(torch.float8_e4m3fn)
    rewrite_safetensors(path, change)
    with pytest.raises(CheckpointError, match=rf"'{Q}_scale_inv' in .*model.safetensors is .* must be \[2, 2\] "
                                              rf"\(one per 128x128 block\), F32 or another float dtype"):
        load_model(str(directory), dtype=torch.float32)


@pytest.mark.parametrize("value", [float("inf"), float("nan"), -1.0], ids=["inf", "nan", "negative"])
@pytest.mark.parametrize("key", [Q, "model.layers.1.mlp.experts.gate_up_proj"], ids=["linear", "experts"])
def test_scale_values_must_be_finite_and_not_negative(fp8, key, value):
    """Scale shapes and dtypes were checked, their values not: one inf/NaN/negative block scale loaded and the
    model computed garbage silently (finite logits 0.1-0.9 relative error off the good checkpoint on the CPU). A zero
    scale is an all-zero block, as vLLM loads it (tests/test_loading_as_vllm_does.py)."""
    directory, path = fp8
    scale_key = key + "_scale_inv"
    if scale_key not in load_file(path):  # experts stored per expert
        scale_key = "model.layers.1.mlp.experts.2.up_proj.weight_scale_inv"

    def change(t):
        t[scale_key].view(-1)[-1] = value
    rewrite_safetensors(path, change)
    with pytest.raises(CheckpointError, match=rf"'{re.escape(scale_key)}' in .*model.safetensors holds 1 block "
                                              rf"scale\(s\) that are not finite and >= 0 as float32"):
        load_model(str(directory), dtype=torch.float32)


@pytest.mark.parametrize("field, value, message", [
    ("quant_method", "awq", "quant_method='awq' is not supported"),
    ("fmt", "e5m2", "fmt='e5m2' is not supported"),
    ("weight_block_size", [64, 64], r"weight_block_size=\[64, 64\] is not supported"),
    ("weight_block_size", None, "weight_block_size=None is not supported"),
    ("activation_scheme", "static", "activation_scheme='static' is not supported"),
])
def test_unknown_quantization_config(fp8, field, value, message):
    directory, _ = fp8
    edit_config(directory, lambda c: c["quantization_config"].update({field: value}))
    with pytest.raises(ConfigError, match=rf"config.json: quantization_config.{message}"):
        load_model(str(directory), dtype=torch.float32)


def test_fp8_tensor_without_quantization_config(fp8):
    directory, _ = fp8
    edit_config(directory, lambda c: c.pop("quantization_config"))
    with pytest.raises(CheckpointError, match="is float8_e4m3fn, but config.json has no quantization_config"):
        load_model(str(directory), dtype=torch.float32)


def test_module_listed_as_not_converted_but_stored_fp8(fp8):
    directory, _ = fp8
    edit_config(directory, lambda c: c["quantization_config"]["modules_to_not_convert"].append("self_attn.q_proj"))
    with pytest.raises(CheckpointError, match=rf"'{Q}' in .* is float8_e4m3fn, but "
                                              rf"quantization_config.modules_to_not_convert lists"):
        load_model(str(directory), dtype=torch.float32)


def test_fused_parts_of_two_precisions(fp8, written):
    directory, path = fp8
    k = Q.replace("q_proj", "k_proj")
    plain = load_file(written[1] / "model.safetensors")
    rewrite_safetensors(path, lambda t: (t.pop(k + "_scale_inv"), t.update({k: plain[k]})))
    with pytest.raises(CheckpointError, match=r"qkv_proj is fused from .*float8_e4m3fn.* and .*F32.*: its parts "
                                              r"must share one precision"):
        load_model(str(directory), dtype=torch.float32)


def test_scale_without_fp8_weight(fp8):
    directory, path = fp8
    gate = "model.layers.0.mlp.gate.weight"
    rewrite_safetensors(path, lambda t: t.update({gate + "_scale_inv": torch.ones(1, 2)}))
    with pytest.raises(CheckpointError, match=rf"'{gate}_scale_inv' in .* scales '{gate}', which is F32"):
        load_model(str(directory), dtype=torch.float32)


def test_fp8_lm_head_refused(fp8):
    directory, path = fp8

    def change(t):
        t["lm_head.weight"], t["lm_head.weight_scale_inv"] = quantize_fp8_blocks(t["lm_head.weight"])
    rewrite_safetensors(path, change)
    edit_config(directory, lambda c: c["quantization_config"].update(modules_to_not_convert=[]))
    with pytest.raises(CheckpointError, match="an FP8 LM head is not supported"):
        load_model(str(directory), dtype=torch.float32)


@pytest.mark.parametrize("heads, kv_heads, message", [
    # three heads of 64: o_proj's K = 192 is not whole 128-blocks (activations are quantised per 128 columns)
    (3, 1, r"'model.layers.0.self_attn.o_proj.weight' in .*: FP8 model.layers.0.self_attn.o_proj has input size "
           r"K = 192, not a multiple of 128"),
    # one KV head of 64: k_proj fills rows [256, 320) of qkv_proj, so its scales would share a block with v_proj's
    (4, 1, r"tensor 'model.layers.0.self_attn.k_proj.weight' fills rows \[256, 320\) of a fused FP8 weight"),
])
def test_dimensions_not_divisible(tmp_path, monkeypatch, heads, kv_heads, message):
    from tests import fp8_fixtures

    monkeypatch.setitem(fp8_fixtures.__dict__, "_BASE", dict(fp8_fixtures._BASE, num_attention_heads=heads,
                                                             num_key_value_heads=kv_heads))
    directory, _ = write_fp8_checkpoint("mixtral", tmp_path)
    with pytest.raises(CheckpointError, match=message):
        load_model(str(directory), dtype=torch.float32)


def test_online_quantization_of_a_bf16_checkpoint(written):
    """The dequantised checkpoint (high precision) quantised at load: its FP8 weights are the checkpoint's values
    re-quantised, which reproduces them (a dequantised block has its amax at an e4m3 grid point), so the model
    equals the W8A8 reference of the same weights."""
    fp8_dir, deq_dir = written
    ours, _ = load_model(str(deq_dir), dtype=torch.float32, quantization="fp8")
    assert all(isinstance(b.experts, Fp8Experts) for b in ours.moe_blocks())
    assert isinstance(ours.model.layers[0].mlp.shared_expert.down_proj, Fp8Linear)
    assert ours.moe_blocks()[0].gate.weight.dtype == torch.float32  # the router stays high precision
    assert ours.moe_blocks()[0].shared_expert_gate.weight.dtype == torch.float32
    actual = PagedRunner(ours).step({"s": PROMPT}, all_logits=True)["s"]
    expected = hf_logits(fake_quant_hf(hf_float32(deq_dir), "qwen2_moe"), PROMPT)
    assert row_errors(actual, expected).max() < 1e-4
    none, _ = load_model(str(deq_dir), dtype=torch.float32, quantization="none")
    assert not any(p.dtype == FP8_DTYPE for p in none.parameters())


def test_fp8_preset_is_the_quantised_bf16_preset(monkeypatch):
    """Random weights: each FP8 weight is the quantised draw of the same parameter of the high-precision preset."""
    monkeypatch.setitem(PRESETS, "tiny256", dict(PRESETS["tiny"], hidden_size=256, moe_intermediate_size=128,
                                                 intermediate_size=256, head_dim=64))
    fp8, _ = load_model("tiny256", random_weights=True, dtype=torch.float32, quantization="fp8")
    plain, _ = load_model("tiny256", random_weights=True, dtype=torch.float32)
    fp8_params = dict(fp8.named_parameters())
    for name, p in plain.named_parameters():
        twin = fp8_params[name]
        if twin.dtype == FP8_DTYPE:
            scale = fp8_params[name + "_scale_inv"]
            deq = dequantize_fp8_blocks(twin, scale) if twin.dim() == 2 else torch.stack(
                [dequantize_fp8_blocks(twin[e], scale[e]) for e in range(twin.shape[0])])
            assert (deq - p).abs().max() <= p.abs().max() / 16  # e4m3: 3 mantissa bits
            assert (deq - p).abs().max() > 0
        else:
            assert torch.equal(twin, p), name


def test_quantization_pads_experts_and_keeps_ragged_linears():
    """tiny (H = 64, I = 32): the experts are quantised padded to whole 128-blocks; q/k/v and o (K = 64) stay in high
    precision (FP8 activations are quantised per 128 columns of K)."""
    from model.layers.fp8 import Fp8Experts
    from model.layers.linear import Linear

    model, _ = load_model("tiny", dtype=torch.float32, quantization="fp8")
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts, Fp8Experts) and experts.is_padded and experts.down_proj.shape[1:] == (128, 128)
    assert type(model.model.layers[0].self_attn.qkv_proj) is Linear
    with pytest.raises(ValueError, match="unknown quantization 'int4'"):
        load_model("tiny", dtype=torch.float32, quantization="int4")


def test_qwen2_57b_fits_an_80gb_gpu_only_in_fp8():
    """Weight bytes of the shape-only (meta) model: 115 GB in bf16, under 60 GB in FP8."""
    def weight_bytes(quantization):
        model, _ = load_model("qwen2-57b-a14b", random_weights=True, device="meta", quantization=quantization)
        return sum(p.numel() * p.element_size() for p in model.parameters())

    bf16, fp8 = weight_bytes("none"), weight_bytes("fp8")
    assert bf16 == pytest.approx(114.8e9, rel=0.01)
    assert 56e9 < fp8 < 60e9


def test_glm_4_5_air_fits_one_h200_only_in_fp8():
    """214 GB in bf16; in FP8 108 GB, under a 141 GB H200 with room for KV, over an 80 GB H100. The first layer's
    dense down projection (K = 10944, not whole 128-blocks) stays bf16; every other GEMM is FP8."""
    def model_of(quantization):
        return load_model("glm-4.5-air", random_weights=True, device="meta", quantization=quantization)[0]

    def weight_bytes(model):
        return sum(p.numel() * p.element_size() for p in model.parameters())

    fp8 = model_of("fp8")
    assert weight_bytes(model_of("none")) == pytest.approx(213.7e9, rel=0.01)
    assert 100e9 < weight_bytes(fp8) < 110e9
    dense = fp8.model.layers[0].mlp
    assert isinstance(dense.gate_up_proj, Fp8Linear) and dense.down_proj.weight.dtype == torch.bfloat16
    assert isinstance(fp8.model.layers[1].mlp.shared_expert.down_proj, Fp8Linear)
    assert fp8.moe_blocks()[0].gate.e_score_correction_bias.dtype == torch.float32


def test_fused_3d_fp8_experts_load_like_per_expert_ones(fp8, written):
    """transformers 5's in-memory layout, experts.gate_up_proj [E, 2I, H] + experts.gate_up_proj_scale_inv
    [E, 2I/128, H/128] (and down_proj alike), gives the same model as the per-expert keys."""
    directory, path = fp8

    def fuse(t):
        for layer in (0, 1):
            p = f"model.layers.{layer}.mlp.experts"
            for suffix in ("", "_scale_inv"):
                key = lambda e, part: f"{p}.{e}.{part}.weight{suffix}"  # noqa: E731
                t[f"{p}.gate_up_proj{suffix}"] = torch.stack(
                    [torch.cat([t.pop(key(e, "gate_proj")), t.pop(key(e, "up_proj"))]) for e in range(6)])
                t[f"{p}.down_proj{suffix}"] = torch.stack([t.pop(key(e, "down_proj")) for e in range(6)])
    rewrite_safetensors(path, fuse)
    fused, _ = load_model(str(directory), dtype=torch.float32)
    per_expert, _ = load_model(str(written[0]), dtype=torch.float32)
    for (name, a), (_, b) in zip(fused.named_parameters(), per_expert.named_parameters()):
        assert torch.equal(a.view(torch.uint8) if a.dtype == FP8_DTYPE else a,
                           b.view(torch.uint8) if b.dtype == FP8_DTYPE else b), name


def test_fp8_router_with_a_correction_bias_is_refused(tmp_path, monkeypatch):
    """GLM-4.5 / DeepSeek-V3 routers choose experts by float32 scores plus a bias: an FP8 one is refused, naming
    the tensor (their published FP8 checkpoints keep the router in bf16)."""
    import tests.fp8_fixtures as fixtures

    monkeypatch.setitem(fixtures.NOT_CONVERTED, "glm4_moe", ["lm_head"])  # the router quantised too
    directory, _ = write_fp8_checkpoint("glm4_moe", tmp_path)
    with pytest.raises(CheckpointError, match=r"'model\.layers\.1\.mlp\.gate\.weight' .* is float8_e4m3fn, but a "
                                              r"router with e_score_correction_bias is served in high precision"):
        load_model(str(directory), dtype=torch.float32)

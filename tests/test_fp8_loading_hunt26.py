"""Loading quantised checkpoints, probed against the formats' definitions (session 26's defect hunt).

Defects, each shown by a test here that failed before its fix: a block-FP8 router under grouped routing (DeepSeek-V2's
group-limited or scaled softmax) loaded and then every forward raised AttributeError; FP8 experts stored in gpt-oss's
transposed, gate/up-interleaved layout died mid-copy on a bare RuntimeError naming no tensor; an FP8 tensor under
an MXFP4 quantization_config was said to have no quantization_config. The rest pin what was checked and found
right: scales in another shard than their weights, dequantised-at-load weights against float64, online
quantisation per block against amax / 448, modules_to_not_convert matching, e5m2 and mis-shaped scales refused,
MXFP4 decoding of every byte.
"""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.checkpoint import CheckpointError
from model.kernels.fp8 import FP8_DTYPE
from model.layers.fp8 import Fp8Experts, Fp8Linear
from model.loader import load_model
from model.mxfp4 import dequantize_mxfp4
from model.quant_config import Fp8CheckpointConfig
from model.quantization import apply_fp8, online_targets
from tests import fp8_fixtures
from tests.deepseek_fixtures import make_deepseek_model
from tests.fp8_fixtures import dequantize_blocks, quantize_blocks, write_fp8_checkpoint
from tests.model_fixtures import make_hf_model, rewrite_safetensors, save_checkpoint

BLOCK = 128
# every finite float8_e4m3fn value, from its 256 bit patterns (the format, not our quantiser)
E4M3_GRID = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).double()
E4M3_GRID = E4M3_GRID[torch.isfinite(E4M3_GRID)].unique()


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == FP8_DTYPE else t


def edit_config(directory, change):
    config = json.loads((directory / "config.json").read_text())
    change(config)
    (directory / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory):
    """A DeepSeek-V2 net with group-limited routing and routed_scaling_factor (grouped routing, no correction bias),
    as a block-FP8 checkpoint in V3's format (every linear FP8, kv_b_proj too; routers and head bf16).
    kv_lora_rank 160: kv_b_proj's K and kv_a_proj_with_mqa's N (192) end on ragged 128-blocks."""
    hf = make_deepseek_model("v2-grouped-yarn", seed=7, hidden_size=256, intermediate_size=256,
                             moe_intermediate_size=128, qk_rope_head_dim=32, qk_nope_head_dim=32, v_head_dim=32,
                             q_lora_rank=128, kv_lora_rank=160)
    return write_fp8_checkpoint("deepseek_v2", tmp_path_factory.mktemp("ds_v2_grouped"), hf=hf)[0]


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    return write_fp8_checkpoint("qwen2_moe", tmp_path_factory.mktemp("qwen2_fp8"), seed=11)[0]


def copy_of(directory, tmp_path):
    return shutil.copytree(directory, tmp_path / "copy")


# --- defects -----------------------------------------------------------------------------------------------------

def test_fp8_router_under_grouped_routing_is_refused(deepseek, tmp_path):
    """Grouped routing scores F.linear(x, gate.weight) in float32 from the weight itself; an FP8 router (swapped for
    an Fp8Linear) loaded without complaint and the first forward raised AttributeError (no e_score_correction_bias),
    after the whole load. vLLM builds DeepSeek's gate unquantised too; refused at start-up, naming the tensor."""
    directory = copy_of(deepseek, tmp_path)
    gate = "model.layers.1.mlp.gate.weight"

    def quantize_router(t):
        t[gate], t[gate + "_scale_inv"] = quantize_blocks(t[gate])
    rewrite_safetensors(directory / "model.safetensors", quantize_router)
    edit_config(directory, lambda c: c["quantization_config"].update(modules_to_not_convert=["lm_head"]))
    with pytest.raises(CheckpointError, match=rf"'{gate}' in .*model.safetensors is float8_e4m3fn, but a router "
                                              rf"with grouped routing .* is served in high precision only"):
        load_model(str(directory), dtype=torch.float32)


def test_fp8_experts_in_gpt_oss_layout_are_refused(tmp_path):
    """gpt-oss stores experts [E, H, 2I] with gate/up columns interleaved and converts them at load; 128x128 block
    scales of the stored matrix cannot follow that (an interleaved block mixes gate and up rows). They passed every
    check (their shapes are those of the stored matrices) and the load died in the weight copy on a RuntimeError
    from copy_ (scales [E, I/128, H/128] into our [E, H/128, I/128]), naming no tensor."""
    hf = make_hf_model("gpt_oss", seed=3, hidden_size=256, intermediate_size=128, head_dim=64,
                       num_attention_heads=4, num_key_value_heads=2)
    directory = save_checkpoint(hf, tmp_path / "oss_fp8")

    def quantize_experts(t):
        for key in [k for k in t if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
            pairs = [quantize_blocks(m) for m in t[key]]  # per expert, the stored [E, in, out] matrices
            t[key] = torch.stack([q for q, _ in pairs])
            t[key + "_scale_inv"] = torch.stack([s for _, s in pairs])
    rewrite_safetensors(directory / "model.safetensors", quantize_experts)
    edit_config(directory, lambda c: c.update(quantization_config=dict(
        quant_method="fp8", fmt="e4m3", activation_scheme="dynamic", weight_block_size=[BLOCK, BLOCK])))
    with pytest.raises(CheckpointError, match=r"'model\.layers\.\d\.mlp\.experts\.(gate_up|down)_proj' in .* is "
                                              r"float8_e4m3fn in a layout converted at load"):
        load_model(str(directory), dtype=torch.float32)


def test_fp8_tensor_under_an_mxfp4_config(qwen2, tmp_path):
    """The refusal said "config.json has no quantization_config" of a config that declares one (mxfp4)."""
    directory = copy_of(qwen2, tmp_path)
    edit_config(directory, lambda c: c.update(quantization_config={"quant_method": "mxfp4"}))
    with pytest.raises(CheckpointError, match="is float8_e4m3fn, but config.json declares another "
                                              "quantization_config") as err:
        load_model(str(directory), dtype=torch.float32)
    assert "has no quantization_config" not in str(err.value)


# --- checked and found right ---------------------------------------------------------------------------------------

def test_scales_in_another_shard_than_their_weights(deepseek, tmp_path):
    """Every *_scale_inv in a shard of its own (index-listed): the same model as the one-file checkpoint, including
    the kv_b_proj weights dequantised at load, whose weight and scale are then read from two files."""
    directory = copy_of(deepseek, tmp_path)
    tensors = load_file(directory / "model.safetensors")
    (directory / "model.safetensors").unlink()
    shards = {"model-00001-of-00002.safetensors": {k: v for k, v in tensors.items() if not k.endswith("_scale_inv")},
              "model-00002-of-00002.safetensors": {k: v for k, v in tensors.items() if k.endswith("_scale_inv")}}
    for name, part in shards.items():
        save_file(part, directory / name, metadata={"format": "pt"})
    weight_map = {k: name for name, part in shards.items() for k in part}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    sharded, _ = load_model(str(directory), dtype=torch.float32)
    whole, _ = load_model(str(deepseek), dtype=torch.float32)
    assert any(p.dtype == FP8_DTYPE for p in sharded.parameters())
    for (name, a), b in zip(sharded.named_parameters(), whole.parameters()):
        assert torch.equal(bits(a), bits(b)), name


def test_dequantised_at_load_equals_float64_fp8_times_scale(deepseek):
    """kv_b_proj (K = 160: one whole and one ragged 128-column block) is served in float32 as fp8 x its block's scale:
    the product is exact in float64 (4 + 24 significant bits), so the float32 value is its one rounding."""
    ours, _ = load_model(str(deepseek), dtype=torch.float32)
    stored = load_file(deepseek / "model.safetensors")
    for i, layer in enumerate(ours.model.layers):
        key = f"model.layers.{i}.self_attn.kv_b_proj.weight"
        q, scale = stored[key], stored[key + "_scale_inv"]
        assert q.dtype == FP8_DTYPE and scale.shape == (-(-q.shape[0] // BLOCK), -(-q.shape[1] // BLOCK)) == (2, 2)
        assert torch.equal(layer.self_attn.kv_b_proj.weight, dequantize_blocks(q, scale))


def assert_block_quantised(q: torch.Tensor, scale: torch.Tensor, w: torch.Tensor, name: str) -> None:
    """q [N, K] e4m3 and scale [ceil(N/128), ceil(K/128)] quantise w [N, K] as the format defines: per 128x128 block,
    scale = amax / 448 (float32, correctly rounded) and each q the e4m3 grid point just below or above w / scale,
    within half a grid step of it."""
    w = w.double()
    assert scale.shape == (-(-w.shape[0] // BLOCK), -(-w.shape[1] // BLOCK)), name
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            block = (slice(i * BLOCK, (i + 1) * BLOCK), slice(j * BLOCK, (j + 1) * BLOCK))
            amax, s = w[block].abs().max().item(), scale[i, j].item()
            if amax == 0:
                assert not q[block].double().any(), name
                continue
            assert abs(s - amax / 448) <= amax / 448 * 2.0**-24, (name, i, j)  # within half a float32 ulp
            x = (w[block] / s).reshape(-1).contiguous()
            at = torch.searchsorted(E4M3_GRID, x).clamp(1, len(E4M3_GRID) - 1)
            lo, hi = E4M3_GRID[at - 1], E4M3_GRID[at]
            got = q[block].double().reshape(-1)
            assert ((got == lo) | (got == hi)).all(), (name, i, j)
            assert ((got - x).abs() <= (hi - lo) / 2 * (1 + 2.0**-20)).all(), (name, i, j)


@pytest.mark.parametrize("source", ["tiny", "qwen2"])
def test_online_quantisation_per_block_against_amax_over_448(source, qwen2):
    """--quantization fp8 of a high-precision model: every FP8 weight against the per-block definition. tiny's
    experts (H = 64, I = 32) are zero-padded to [2 x 128, 128] (gate rows at 0, up rows at 128) and quantised so;
    qwen2's router and shared-expert gate stay as they are."""
    if source == "tiny":
        plain, _ = load_model("tiny", dtype=torch.float32)
    else:  # the dequantised values, perturbed off the e4m3 grid so the quantisation is not the identity
        plain, _ = load_model(str(qwen2.parent / "dequantized"), dtype=torch.float32)  # written beside it
        with torch.no_grad():
            gen = torch.Generator().manual_seed(1)
            for p in plain.parameters():
                p.mul_(1 + 0.05 * torch.randn(p.shape, generator=gen))
    originals = {n: p.clone() for n, p in plain.named_parameters()}
    targets = online_targets(plain)
    fp8 = apply_fp8(plain, list(targets))
    assert targets and all(isinstance(fp8.get_submodule(t), (Fp8Linear, Fp8Experts)) for t in targets)
    params = dict(fp8.named_parameters())
    for name, q in params.items():
        if q.dtype != FP8_DTYPE:
            continue
        w, scale = originals[name], params[name + "_scale_inv"]
        module = fp8.get_submodule(name.rpartition(".")[0])
        if isinstance(module, Fp8Experts) and module.is_padded:
            E, rows, cols = q.shape
            padded = torch.zeros(E, rows, cols, dtype=w.dtype)
            if name.endswith("gate_up_proj"):
                inter = w.shape[1] // 2
                padded[:, :inter, : w.shape[2]] = w[:, :inter]
                padded[:, rows // 2: rows // 2 + inter, : w.shape[2]] = w[:, inter:]
            else:
                padded[:, : w.shape[1], : w.shape[2]] = w
            w = padded
        if q.dim() == 2:
            assert_block_quantised(q, scale, w, name)
        else:
            for e in range(q.shape[0]):
                assert_block_quantised(q[e], scale[e], w[e], f"{name}[{e}]")
    high = [n for n, p in params.items() if p.dtype != FP8_DTYPE and not n.endswith("_scale_inv")]
    assert all(torch.equal(params[n], originals[n]) for n in high)


@pytest.mark.parametrize("module, entry, listed", [
    ("lm_head", "lm_head", True),
    ("model.layers.0.mlp.gate", "model.layers.0.mlp.gate", True),  # Qwen3-FP8's full names
    ("model.layers.0.mlp.gate", "mlp.gate", True),  # trailing components
    ("model.layers.1.self_attn.q_proj", "model.layers.1", True),  # a parent module, at a dot
    ("model.layers.1.self_attn.q_proj", "model.layers.1.", True),
    ("model.layers.10.self_attn.q_proj", "model.layers.1", False),  # not a parent: a character prefix
    ("model.layers.0.mlp.gate_proj", "mlp.gate", False),  # no substring match
    ("model.layers.0.mlp.shared_expert_gate", "gate", False),
    ("model.layers.0.mlp.experts.3.down_proj", "experts.3", False),
])
def test_modules_to_not_convert_matching(module, entry, listed):
    """Entries name modules (HF names), or parents of them, at component boundaries (transformers' prefix + "." and
    trailing-name rules), never substrings of a component."""
    assert Fp8CheckpointConfig(modules_to_not_convert=(entry,)).keeps_high_precision(module) is listed


@pytest.mark.parametrize("change, message", [
    (lambda t, k: t.update({k: t[k].float().to(torch.float8_e5m2)}), r"'{k}' in .* has dtype F8_E5M2"),
    (lambda t, k: t.update({k + "_scale_inv": t[k + "_scale_inv"][None]}),
     r"'{k}_scale_inv' in .* is F32 \[1, 2, 2\]; the scales of '{k}' \[256, 256\] must be \[2, 2\]"),
    (lambda t, k: t.update({k + "_scale_inv": t[k + "_scale_inv"].to(torch.float8_e4m3fn)}),
     r"'{k}_scale_inv' in .* is F8_E4M3 \[2, 2\]"),  # bf16 scales load (tests/test_loading_as_vllm_does.py)
], ids=["e5m2", "extra-dim", "e4m3-scale"])
def test_unservable_fp8_tensors_are_named(qwen2, tmp_path, change, message):
    directory = copy_of(qwen2, tmp_path)
    key = "model.layers.0.self_attn.o_proj.weight"
    rewrite_safetensors(directory / "model.safetensors", lambda t: change(t, key))
    with pytest.raises(CheckpointError, match=message.format(k=key.replace(".", r"\."))):
        load_model(str(directory), dtype=torch.float32)


def test_mxfp4_every_byte_and_scale_against_the_spec():
    """All 256 bytes (two e2m1 codes: low nibble first) under e8m0 scales 0 (2^-127), 1, 127 (1) and 254 (2^127;
    6 x 2^127 overflows float32 to inf, as the exact value rounds), against the OCP bit formula in float64."""
    def e2m1(code: int) -> float:
        sign = -1.0 if code & 8 else 1.0
        exponent, mantissa = (code >> 1) & 3, code & 1
        return sign * (mantissa * 0.5 if exponent == 0 else 2.0 ** (exponent - 1) * (1 + mantissa / 2))

    data = torch.arange(256, dtype=torch.uint8).reshape(16, 16)  # 16 groups of 16 bytes
    for s in (0, 1, 127, 254):
        out = dequantize_mxfp4(data, torch.full((16,), s, dtype=torch.uint8), torch.float32)
        expected = torch.tensor([e2m1(code) * 2.0 ** (s - 127) for byte in range(256)
                                 for code in (byte & 15, byte >> 4)], dtype=torch.float64).float()
        assert torch.equal(out, expected) and torch.equal(torch.signbit(out), torch.signbit(expected)), s


def test_fixture_quantiser_is_the_format():
    """The checkpoint writer used above (tests/fp8_fixtures.py) against the per-block definition, so the references
    the other tests draw from it are the format's."""
    w = torch.randn(300, 200, generator=torch.Generator().manual_seed(4)) * 0.1
    q, scale = fp8_fixtures.quantize_blocks(w)
    assert_block_quantised(q, scale, w, "fixture")

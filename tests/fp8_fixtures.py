"""Tiny block-FP8 checkpoints written by the tests themselves, and the references they are compared with.

The format (DeepSeek-V3 / Qwen3-FP8): each quantised weight stored as float8_e4m3fn with `<name>_scale_inv`, one
float32 scale per 128x128 block, dequantised = fp8 x scale. `quantize_blocks` writes it with its own block loop in
float64 (independent of model/kernels/fp8.py, which it must agree with only through the format); the references
are HF transformers models whose weights are the dequantised FP8 values, in float32:
- `hf_float32(dequantized directory)`: weights only (what the checkpoint means);
- `fake_quant_hf`: the same, and every FP8 GEMM's input quantised per (token, 128 columns) as W8A8 with
  activation_scheme "dynamic" prescribes, by hooks and an experts implementation of this file. Its distance from
  `dequantized_hf` is the activation-quantisation error the parity tolerance is derived from.
"""

import copy
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from tests.model_fixtures import make_hf_model, save_checkpoint

E4M3_MAX = 448.0
BLOCK = 128
_BASE = dict(vocab_size=320, hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=64)
# hidden 256 and expert intermediate 256: two 128-blocks along every K; q/k/v row counts whole blocks (so the fused
# qkv scales line up); a ragged N block where the router is FP8 (qwen3_moe: E=8 rows in one block).
FP8_CONFIGS = {
    "qwen3_moe": dict(model_type="qwen3_moe", intermediate_size=384, moe_intermediate_size=256, num_experts=8,
                      num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[1]),
    "qwen2_moe": dict(model_type="qwen2_moe", intermediate_size=384, moe_intermediate_size=128,
                      shared_expert_intermediate_size=256, num_experts=6, num_experts_per_tok=3,
                      norm_topk_prob=False, qkv_bias=True),
    "mixtral": dict(model_type="mixtral", intermediate_size=256, num_local_experts=4, num_experts_per_tok=2),
    "olmoe": dict(model_type="olmoe", intermediate_size=256, num_experts=8, num_experts_per_tok=3,
                  norm_topk_prob=False, clip_qkv=None),
    # shared_experts.* keys (renamed at load, their scales too), a float32 correction bias beside a bf16 router
    "glm4_moe": dict(model_type="glm4_moe", intermediate_size=384, moe_intermediate_size=128, n_routed_experts=8,
                     num_experts_per_tok=3, n_group=2, topk_group=1, norm_topk_prob=True, routed_scaling_factor=1.5,
                     n_shared_experts=2, first_k_dense_replace=1),
}
# Modules each family's checkpoint keeps in bf16, as published FP8 checkpoints do (Qwen3-FP8 lists its routers; the
# qwen3_moe test instead quantises the router too, to cover a ragged scale block).
NOT_CONVERTED = {"qwen3_moe": ["lm_head"], "qwen2_moe": ["lm_head", "mlp.gate", "shared_expert_gate"],
                 "mixtral": ["lm_head", "block_sparse_moe.gate", "mlp.gate"], "olmoe": ["lm_head", "mlp.gate"],
                 "glm4_moe": ["lm_head", "mlp.gate"],
                 # DeepSeek-V3/R1's published checkpoint: every linear FP8 (kv_b_proj too) but the routers and head
                 "deepseek_v2": ["lm_head", "mlp.gate"], "deepseek_v3": ["lm_head", "mlp.gate"]}
# Modules stored in FP8 but served in high precision, dequantised at load (model/fp8_dequantized.py): the W8A8
# reference leaves their inputs unquantised.
DEQUANTIZED_AT_LOAD = {"deepseek_v2": ["kv_b_proj"], "deepseek_v3": ["kv_b_proj"]}


def e4m3_round(v: torch.Tensor) -> torch.Tensor:
    return v.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def quantize_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [rows, cols] -> (e4m3 [rows, cols], float32 [ceil(rows/128), ceil(cols/128)]), block by block in float64;
    scale = amax / 448 (a zero block gets scale 1)."""
    rows, cols = w.shape
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    scale = torch.empty(-(-rows // BLOCK), -(-cols // BLOCK), dtype=torch.float32)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            block = w[i * BLOCK:(i + 1) * BLOCK, j * BLOCK:(j + 1) * BLOCK].double()
            amax = float(block.abs().max())
            s = torch.tensor(amax / E4M3_MAX if amax > 0 else 1.0, dtype=torch.float32)
            q[i * BLOCK:(i + 1) * BLOCK, j * BLOCK:(j + 1) * BLOCK] = e4m3_round(block / s.double())
            scale[i, j] = s
    return q, scale


def dequantize_blocks(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    out = q.double()
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            out[i * BLOCK:(i + 1) * BLOCK, j * BLOCK:(j + 1) * BLOCK] *= float(scale[i, j])
    return out.float()


def _converted(family: str, key: str) -> bool:
    """Whether checkpoint key `key` is a weight this family's FP8 checkpoint stores in FP8."""
    if not key.endswith(".weight") or key.endswith("norm.weight") or "embed_tokens" in key:
        return False
    module = key[: -len(".weight")]
    return not any(module == m or module.endswith("." + m) for m in NOT_CONVERTED[family])


def write_fp8_checkpoint(family: str, directory: Path, seed: int = 0, hf=None) -> tuple[Path, Path]:
    """A random HF model of `family` saved twice: as a block-FP8 checkpoint (`directory / "fp8"`) and with each FP8
    weight replaced by its dequantised float32 value, no quantization_config (`directory / "dequantized"`). `hf`: the
    model to write instead of a new one of FP8_CONFIGS (its matrices are rescaled in place, as a new one's)."""
    if hf is None:
        hf = make_hf_model(family, seed=seed, **_BASE, **FP8_CONFIGS[family])
    with torch.no_grad():  # weights of a trained net's scale, so hidden states stay O(1) over the layers
        for name, p in hf.named_parameters():
            if p.dim() >= 2 and "embed" not in name:
                p.mul_(0.6 / p.shape[-1] ** 0.5 / 0.15)
    fp8_dir, deq_dir = directory / "fp8", directory / "dequantized"
    for d in (fp8_dir, deq_dir):
        save_checkpoint(hf, d)
    tensors = load_file(fp8_dir / "model.safetensors")
    dequantized = dict(tensors)
    for key in [k for k in tensors if _converted(family, k)]:
        q, scale = quantize_blocks(tensors[key])
        tensors[key], tensors[key + "_scale_inv"] = q, scale
        dequantized[key] = dequantize_blocks(q, scale)
    save_file(tensors, fp8_dir / "model.safetensors", metadata={"format": "pt"})
    save_file(dequantized, deq_dir / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((fp8_dir / "config.json").read_text())
    config["quantization_config"] = dict(quant_method="fp8", fmt="e4m3", activation_scheme="dynamic",
                                         weight_block_size=[BLOCK, BLOCK], modules_to_not_convert=NOT_CONVERTED[family])
    (fp8_dir / "config.json").write_text(json.dumps(config, indent=2))
    return fp8_dir, deq_dir


def hf_float32(directory: Path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32,
                                                             attn_implementation="eager").eval()


def _fake_quant(x: torch.Tensor) -> torch.Tensor:
    """Per (row, 128 columns): x -> e4m3(x / s) * s with s = amax / 448, in float64 (the W8A8 activation scheme)."""
    shape = x.shape
    v = x.double().reshape(-1, shape[-1] // BLOCK, BLOCK)
    s = (v.abs().amax(-1, keepdim=True) / E4M3_MAX).float().double().clamp_min(1e-30)
    return (e4m3_round(v / s).double() * s).reshape(shape).to(x.dtype)


def _fake_quant_experts(self, hidden_states, top_k_index, top_k_weights):
    """HF experts forward (transformers 5 layout, SwiGLU) with W8A8 activations: inputs and SiLU(gate)*up quantised."""
    x = _fake_quant(hidden_states)
    out = torch.zeros_like(hidden_states)
    inter = self.down_proj.shape[-1]
    for t in range(x.shape[0]):
        for slot in range(top_k_index.shape[1]):
            e = int(top_k_index[t, slot])
            gate_up = self.gate_up_proj[e] @ x[t]
            h = _fake_quant((F.silu(gate_up[:inter]) * gate_up[inter:])[None])[0]
            out[t] += top_k_weights[t, slot] * (self.down_proj[e] @ h)
    return out


def fake_quant_hf(reference, family: str):
    """`reference` (dequantised weights) with W8A8 activations on every FP8 weight, as our model computes."""
    from transformers.integrations.moe import ExpertsInterface

    model = copy.deepcopy(reference)
    ExpertsInterface.register("w8a8_reference", _fake_quant_experts)
    model.set_experts_implementation("w8a8_reference")
    for name, module in model.named_modules():  # linears and routers alike: any module with an FP8 weight matrix
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 2 and _converted(family, name + ".weight") and \
                name.rsplit(".", 1)[-1] not in DEQUANTIZED_AT_LOAD.get(family, ()):
            module.register_forward_pre_hook(lambda m, args: (_fake_quant(args[0]), *args[1:]))
    return model

"""MXFP4 checkpoints (gpt-oss's published format): a tiny gpt_oss model whose experts hold values that MXFP4 represents
exactly, written both as transformers saves it (fp32) and as an MXFP4 checkpoint (`*_blocks` + `*_scales`, built here
from the spec's bit layout, not from model/mxfp4.py): both load to the same parameters, and the MXFP4 one matches HF's
logits and greedy continuation. Plus the decoder against hand-worked bytes, and the errors."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.checkpoint import CheckpointError
from model.loader import load_model
from model.mxfp4 import dequantize_mxfp4
from tests.model_fixtures import PagedRunner, hf_greedy, hf_logits, make_hf_model, max_relative_error, save_checkpoint

PROMPT = [5, 77, 203, 19, 150, 8, 66, 301, 42, 42, 7, 260, 99]


def e2m1(code: int) -> float:
    """The OCP spec's e2m1: sign bit 3, exponent bits 2-1 (bias 1), mantissa bit 0; exponent 0 is subnormal."""
    sign = -1.0 if code & 8 else 1.0
    exponent, mantissa = (code >> 1) & 3, code & 1
    return sign * (mantissa * 0.5 if exponent == 0 else 2.0 ** (exponent - 1) * (1 + mantissa / 2))


def random_mxfp4(shape: tuple[int, int, int], gen: torch.Generator):
    """Codes [E, R, C] and e8m0 scales [E, R, C/32] -> (values [E, R, C] float32, blocks, scales) in the
    checkpoint's byte layout: element 2i of a block in the low nibble of byte i, 2i+1 in the high nibble."""
    E, R, C = shape
    codes = torch.randint(0, 16, (E, R, C), generator=gen, dtype=torch.uint8)
    scales = torch.randint(121, 125, (E, R, C // 32), generator=gen, dtype=torch.uint8)  # 2^-6 .. 2^-3
    table = torch.tensor([e2m1(c) for c in range(16)])
    values = table[codes.long()] * torch.exp2(scales.float() - 127).repeat_interleave(32, dim=-1)
    pairs = codes.view(E, R, C // 32, 16, 2)
    blocks = pairs[..., 0] | (pairs[..., 1] << 4)  # [E, R, C/32, 16]
    return values, blocks.contiguous(), scales


def test_decoder_against_hand_worked_bytes():
    blocks = torch.tensor([[0x21, 0xF8, 0x7A] + [0] * 13], dtype=torch.uint8)  # [1 group, 16 bytes]
    scales = torch.tensor([128], dtype=torch.uint8)  # x 2
    out = dequantize_mxfp4(blocks, scales, torch.float32)
    # 0x21: low 1 (0.5), high 2 (1.0); 0xF8: low 8 (-0), high 15 (-6); 0x7A: low 10 (-1), high 7 (6)
    assert out[:6].tolist() == [1.0, 2.0, -0.0, -12.0, -2.0, 12.0] and out.shape == (32,)
    assert torch.signbit(out[2]) and not out[6:].any()
    tiny = dequantize_mxfp4(blocks, torch.tensor([0], dtype=torch.uint8), torch.bfloat16)  # 2^-127: bf16 subnormals
    assert tiny[0].item() == 0.5 * 2.0**-127 and tiny[3].item() == -6 * 2.0**-127


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(HF model, fp32 checkpoint directory, MXFP4 checkpoint directory) of one tiny gpt_oss model."""
    hf = make_hf_model("gpt_oss", seed=50)
    gen = torch.Generator().manual_seed(50)
    stored = {}
    with torch.no_grad():
        for i, layer in enumerate(hf.model.layers):
            experts = layer.mlp.experts
            for name, param in (("gate_up_proj", experts.gate_up_proj), ("down_proj", experts.down_proj)):
                E, cols, rows = param.shape  # transformers' [E, in, out]
                values, blocks, scales = random_mxfp4((E, rows, cols), gen)  # stored as [E, out, in]
                param.copy_(values.transpose(1, 2))
                stored[f"model.layers.{i}.mlp.experts.{name}"] = (blocks, scales)
    plain = save_checkpoint(hf, tmp_path_factory.mktemp("oss_fp32"))
    mx = save_checkpoint(hf, tmp_path_factory.mktemp("oss_mxfp4"))
    tensors = load_file(mx / "model.safetensors")
    for key, (blocks, scales) in stored.items():
        del tensors[key]
        tensors[key + "_blocks"], tensors[key + "_scales"] = blocks, scales
    (mx / "model.safetensors").unlink()
    save_file(tensors, mx / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((mx / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (mx / "config.json").write_text(json.dumps(config))
    return hf, plain, mx


def test_mxfp4_checkpoint_loads_the_same_parameters(checkpoints):
    _, plain, mx = checkpoints
    ours_plain, _ = load_model(str(plain), dtype=torch.float32)
    ours_mx, _ = load_model(str(mx), dtype=torch.float32)
    for (name, a), b in zip(ours_plain.named_parameters(), ours_mx.parameters()):
        assert torch.equal(a, b), name


def test_mxfp4_checkpoint_matches_hf(checkpoints):
    hf, _, mx = checkpoints
    ours, _ = load_model(str(mx), dtype=torch.float32)
    expected = hf_logits(hf, PROMPT)
    assert max_relative_error(PagedRunner(ours).step({"s": PROMPT}, all_logits=True)["s"], expected) < 1e-4
    assert PagedRunner(ours).greedy(PROMPT, 32, chunk=5) == hf_greedy(hf, PROMPT, 32)


def test_bf16_load_is_exact(checkpoints):
    """MXFP4 values are exact in bf16: the bf16 model's experts equal the fp32 model's."""
    _, _, mx = checkpoints
    ours32, _ = load_model(str(mx), dtype=torch.float32)
    ours16, _ = load_model(str(mx), dtype=torch.bfloat16)
    a, b = ours32.model.layers[0].mlp.experts, ours16.model.layers[0].mlp.experts
    assert torch.equal(a.gate_up_proj, b.gate_up_proj.float()) and torch.equal(a.down_proj, b.down_proj.float())


def _rewrite(mx, tmp_path, change):
    import shutil

    directory = tmp_path / "broken"
    shutil.copytree(mx, directory)
    tensors = load_file(directory / "model.safetensors")
    change(tensors)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    return directory


KEY = "model.layers.1.mlp.experts.down_proj"


def _plain_shape(blocks: torch.Tensor) -> tuple[int, int, int]:
    """The plain tensor that MXFP4 `blocks` [E, R, G, 16] stand for: [E, G * 32, R] (transformers' layout)."""
    experts, rows, groups, _ = blocks.shape
    return experts, groups * 32, rows


@pytest.mark.parametrize("change,message", [
    (lambda t: t.pop(KEY + "_scales"), f"{KEY}_blocks'.* has no '{KEY}_scales'"),
    (lambda t: t[KEY + "_scales"].view(-1).__setitem__(3, 255), f"'{KEY}_scales'.* e8m0 NaN"),
    (lambda t: t.__setitem__(KEY + "_scales", t[KEY + "_scales"][:, :-1].contiguous()), f"MXFP4 tensor '{KEY}_blocks'"),
    (lambda t: t.__setitem__(KEY + "_scales", t[KEY + "_scales"].float()), f"{KEY}_scales' \\(F32\\)"),
    # the plain weight kept beside its MXFP4 pair: two values for one weight (one was dropped silently)
    (lambda t: t.__setitem__(KEY, torch.zeros(*_plain_shape(t[KEY + "_blocks"]))),
     f"'{KEY}' is stored both plain .* and as MXFP4 '{KEY}_blocks'"),
])
def test_broken_mxfp4_tensors_are_named(checkpoints, tmp_path, change, message):
    _, _, mx = checkpoints
    with pytest.raises(CheckpointError, match=message):
        load_model(str(_rewrite(mx, tmp_path, change)), dtype=torch.float32)


@pytest.mark.gpu
def test_dequantised_on_the_gpu_equals_the_cpu_load(checkpoints):
    _, _, mx = checkpoints
    on_cpu, _ = load_model(str(mx), dtype=torch.bfloat16)
    on_gpu, _ = load_model(str(mx), dtype=torch.bfloat16, device="cuda")
    for (name, a), b in zip(on_cpu.named_parameters(), on_gpu.parameters()):
        assert torch.equal(a, b.cpu()), name


def test_mxfp4_requantised_to_fp8_equals_the_fp32_checkpoint_quantised(checkpoints):
    """--quantization fp8 on an MXFP4 checkpoint: its experts dequantised, zero-padded to 128-blocks (H = 64, I = 32
    here; 2880 in gpt-oss) and quantised per 128x128 block, exactly as the same values from the fp32 checkpoint."""
    _, plain, mx = checkpoints
    from_plain, _ = load_model(str(plain), dtype=torch.float32, quantization="fp8")
    from_mx, _ = load_model(str(mx), dtype=torch.float32, quantization="fp8")
    assert from_mx.model.layers[0].mlp.experts.gate_up_proj.dtype == torch.float8_e4m3fn
    for (name, a), b in zip(from_plain.named_parameters(), from_mx.parameters()):
        assert torch.equal(a.view(torch.uint8) if a.dtype == torch.float8_e4m3fn else a,
                           b.view(torch.uint8) if b.dtype == torch.float8_e4m3fn else b), name

"""Checkpoints vLLM and transformers load that we refused or misread, each shown by a test that failed before its fix:

- block scales (`*_scale_inv`) stored in bf16 / f16 were refused: vLLM copies them into float32 parameters, so do we;
- a zero block scale was refused: it is an all-zero block (fp8 x 0 = 0), which quantisers write for a block whose amax
  is 0; negative, NaN and infinite scales stay refused;
- the NaN codes of float8_e4m3fn (0x7F, 0xFF) in FP8 weights loaded silently and made the logits NaN: refused at load,
  naming the tensor;
- `modules_to_not_convert` / `ignored_layers` entries in the forms published configs use ("re:" regular expressions
  as compressed-tensors writes them, `*` wildcards as ModelOpt and gpt-oss write them, and `ignored_layers` beside
  `modules_to_not_convert`) were compared literally or not read, so an FP8 tensor they list loaded unchecked;
  other forms are refused, naming the entry;
- a `tie_word_embeddings` checkpoint storing only `lm_head.weight` was refused; transformers ties it the other way.
"""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from model.checkpoint import CheckpointError
from model.config import ConfigError
from model.kernels.fp8 import FP8_DTYPE
from model.loader import load_model
from model.quant_config import Fp8CheckpointConfig, QuantConfigError, parse_quantization_config
from tests.deepseek_fixtures import make_deepseek_model
from tests.fp8_fixtures import write_fp8_checkpoint
from tests.model_fixtures import (
    PagedRunner, hf_logits, make_hf_model, max_relative_error, rewrite_safetensors, save_checkpoint,
)

PROMPT = [3, 14, 15, 92, 65, 35, 89, 79, 32]
Q = "model.layers.0.self_attn.q_proj.weight"
EXPERT = "model.layers.1.mlp.experts.2.up_proj.weight"  # stored per expert
KV_B = "model.layers.1.self_attn.kv_b_proj.weight"  # DeepSeek: FP8 in the checkpoint, dequantised at load


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    return write_fp8_checkpoint("qwen2_moe", tmp_path_factory.mktemp("qwen2_fp8"), seed=21)[0]


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory):
    """DeepSeek-V2 in V3's FP8 format: every linear FP8 (kv_b_proj too, which is served dequantised)."""
    hf = make_deepseek_model("v2-lite", seed=8, hidden_size=256, intermediate_size=256, moe_intermediate_size=128,
                             qk_rope_head_dim=32, qk_nope_head_dim=32, v_head_dim=32, kv_lora_rank=128)
    return write_fp8_checkpoint("deepseek_v2", tmp_path_factory.mktemp("ds_fp8"), hf=hf)[0]


def copy_of(directory, tmp_path, name="copy"):
    return shutil.copytree(directory, tmp_path / name)


def edit_config(directory, change):
    config = json.loads((directory / "config.json").read_text())
    change(config)
    (directory / "config.json").write_text(json.dumps(config))


def logits(directory) -> torch.Tensor:
    model, _ = load_model(str(directory), dtype=torch.float32)
    return PagedRunner(model).step({"s": PROMPT}, all_logits=True)["s"]


def change_scales(directory, change) -> None:
    """Apply change(scale) -> new scale tensor to every *_scale_inv of the checkpoint."""
    rewrite_safetensors(directory / "model.safetensors", lambda t: t.update(
        {k: change(v) for k, v in t.items() if k.endswith("_scale_inv")}))


def set_byte(directory, key, index, byte) -> None:
    def change(t):
        t[key].view(torch.uint8)[index] = byte
    rewrite_safetensors(directory / "model.safetensors", change)


# --- block scales: dtype and zero ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("source", ["qwen2", "deepseek"])
def test_half_precision_scales_load_as_their_float32_values(source, dtype, request, tmp_path):
    """Scales stored in bf16 (f16) are the model whose float32 scales hold the same values: the same logits, bit for
    bit (deepseek: kv_b_proj dequantised at load with them too)."""
    fixture = request.getfixturevalue(source)
    as_f32, as_half = copy_of(fixture, tmp_path, "f32"), copy_of(fixture, tmp_path, "half")
    change_scales(as_f32, lambda s: s.to(dtype).float())  # the values bf16 / f16 can hold
    change_scales(as_half, lambda s: s.to(dtype))
    assert load_file(as_half / "model.safetensors")[Q + "_scale_inv"].dtype == dtype
    expected, actual = logits(as_f32), logits(as_half)
    assert torch.isfinite(expected).all() and torch.equal(actual, expected)


def test_fp8_scales_are_refused(qwen2, tmp_path):
    """An e4m3 `_scale_inv` is no block-FP8 scale (it names some other format): refused, naming the tensor."""
    directory = copy_of(qwen2, tmp_path)
    rewrite_safetensors(directory / "model.safetensors",
                        lambda t: t.update({Q + "_scale_inv": t[Q + "_scale_inv"].to(FP8_DTYPE)}))
    with pytest.raises(CheckpointError, match=rf"'{Q}_scale_inv' in .*model.safetensors is F8_E4M3 \[2, 2\]"):
        load_model(str(directory), dtype=torch.float32)


@pytest.mark.parametrize("key", [Q, EXPERT], ids=["linear", "expert"])
def test_a_zero_scale_is_an_all_zero_block(qwen2, key, tmp_path):
    """A zero scale (what amax / 448 gives for a block whose amax is 0) loads; its block counts as zero: the same
    logits as the checkpoint whose block holds zero bytes under its original scale."""
    zero_scale, zero_bytes = copy_of(qwen2, tmp_path, "scale"), copy_of(qwen2, tmp_path, "bytes")
    rewrite_safetensors(zero_scale / "model.safetensors", lambda t: t[key + "_scale_inv"].__setitem__((0, 1), 0.0))
    rewrite_safetensors(zero_bytes / "model.safetensors",
                        lambda t: t[key].view(torch.uint8)[:128, 128:256].zero_())
    stored = load_file(zero_bytes / "model.safetensors")
    assert stored[key + "_scale_inv"][0, 1] > 0 and not stored[key][:128, 128:256].float().any()
    expected, actual = logits(zero_bytes), logits(zero_scale)
    assert torch.isfinite(actual).all() and torch.equal(actual, expected)
    assert not torch.equal(expected, logits(qwen2))  # the block mattered


@pytest.mark.parametrize("value", [-0.5, float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_negative_and_non_finite_scales_are_refused(qwen2, value, dtype, tmp_path):
    directory = copy_of(qwen2, tmp_path)

    def change(t):
        scale = t[Q + "_scale_inv"].to(dtype)
        scale[1, 0] = value
        t[Q + "_scale_inv"] = scale
    rewrite_safetensors(directory / "model.safetensors", change)
    with pytest.raises(CheckpointError, match=rf"'{Q}_scale_inv' in .*model.safetensors holds 1 block scale\(s\) "
                                              rf"that are not finite and >= 0 as float32 .* at \[1, 0\]"):
        load_model(str(directory), dtype=torch.float32)


@pytest.mark.parametrize("value", [1e-50, 1e50])
def test_float64_scales_outside_float32_are_refused(qwen2, value, tmp_path):
    """A float64 scale is read as float32 (as vLLM copies it): one that underflows to 0 or overflows to inf there
    would silently zero or blow up its block."""
    directory = copy_of(qwen2, tmp_path)

    def change(t):
        scale = t[Q + "_scale_inv"].double()
        scale[0, 0] = value
        t[Q + "_scale_inv"] = scale
    rewrite_safetensors(directory / "model.safetensors", change)
    with pytest.raises(CheckpointError, match=r"holds 1 block scale\(s\) that are not finite and >= 0 as float32"):
        load_model(str(directory), dtype=torch.float32)


# --- NaN codes in the FP8 bytes ----------------------------------------------------------------------------------

@pytest.mark.parametrize("key, index, byte", [(Q, (5, 7), 0x7F), (EXPERT, (3, 200), 0xFF)], ids=["linear", "expert"])
def test_nan_codes_in_fp8_weights_are_refused(qwen2, key, index, byte, tmp_path):
    """One NaN byte loaded silently and every logit of a row meeting it came out NaN."""
    directory = copy_of(qwen2, tmp_path)
    set_byte(directory, key, index, byte)
    with pytest.raises(CheckpointError, match=rf"tensor '{key}' in .*model.safetensors holds 1 NaN float8_e4m3fn "
                                              rf"value\(s\) \(byte 0x7F or 0xFF\), the first at \[{index[0]}, "
                                              rf"{index[1]}\]"):
        load_model(str(directory), dtype=torch.float32)


def test_nan_codes_in_fused_3d_experts_are_refused(qwen2, tmp_path):
    """The experts stored fused ([E, 2I, H], as transformers 5 saves them): the tensor and the 3-D position named."""
    directory = copy_of(qwen2, tmp_path)

    def fuse(t):
        for e_key in [k for k in t if k.endswith(".experts.0.gate_proj.weight")]:
            base = e_key[: -len("0.gate_proj.weight")]
            experts = sorted({int(k[len(base):].split(".")[0]) for k in t if k.startswith(base)})
            for name, parts in (("gate_up_proj", ("gate_proj", "up_proj")), ("down_proj", ("down_proj",))):
                for suffix in ("", "_scale_inv"):
                    t[base + name + suffix] = torch.stack([torch.cat(
                        [t.pop(f"{base}{e}.{p}.weight{suffix}") for p in parts]) for e in experts])
        t["model.layers.1.mlp.experts.down_proj"].view(torch.uint8)[2, 9, 4] = 0xFF
    rewrite_safetensors(directory / "model.safetensors", fuse)
    with pytest.raises(CheckpointError, match=r"'model\.layers\.1\.mlp\.experts\.down_proj' in .* holds 1 NaN "
                                              r".* the first at \[2, 9, 4\]"):
        load_model(str(directory), dtype=torch.float32)


def test_nan_codes_in_a_weight_dequantised_at_load_are_refused(deepseek, tmp_path):
    """kv_b_proj is read as fp8 x scale into a high-precision weight: a NaN byte became a NaN weight."""
    directory = copy_of(deepseek, tmp_path)
    set_byte(directory, KV_B, (17, 3), 0x7F)
    with pytest.raises(CheckpointError, match=rf"'{KV_B}' in .*model.safetensors holds 1 NaN .* at \[17, 3\]"):
        load_model(str(directory), dtype=torch.float32)


def test_the_largest_finite_codes_load(qwen2, tmp_path):
    """±448 (0x7E, 0xFE), the codes beside the NaNs, are ordinary values."""
    directory = copy_of(qwen2, tmp_path)
    set_byte(directory, Q, (5, 7), 0x7E)
    set_byte(directory, EXPERT, (3, 200), 0xFE)
    assert torch.isfinite(logits(directory)).all()


# --- modules_to_not_convert / ignored_layers -------------------------------------------------------------------------

@pytest.mark.parametrize("module, entry, listed", [
    # "re:" + a regular expression, matched from the start (compressed-tensors / llm-compressor)
    ("model.layers.0.mlp.gate", r"re:.*mlp.gate$", True),
    ("model.layers.0.mlp.gate_proj", r"re:.*mlp.gate$", False),
    ("lm_head", "re:.*lm_head", True),
    ("model.layers.3.self_attn.q_proj", r"re:model\.layers\.[0-3]\.", True),
    ("model.layers.4.self_attn.q_proj", r"re:model\.layers\.[0-3]\.", False),
    ("model.layers.0.mlp.gate", "re:mlp.gate", False),  # from the start of the name, as re.match
    # `*` wildcards (ModelOpt's exclude_modules, gpt-oss's modules_to_not_convert)
    ("model.layers.7.mlp.gate", "model.layers.*.mlp.gate", True),
    ("model.layers.7.mlp.gate_proj", "model.layers.*.mlp.gate", False),
    ("model.layers.7.self_attn.o_proj", "model.layers.*.self_attn", True),  # a parent
    ("model.layers.7.mlp.shared_expert_gate", "*shared_expert_gate", True),
    ("model.layers.7.mlp.shared_expert_gate", "mlp.*gate", True),  # trailing components
])
def test_wildcard_and_regex_entries(module, entry, listed):
    assert Fp8CheckpointConfig(modules_to_not_convert=(entry,)).keeps_high_precision(module) is listed


@pytest.mark.parametrize("entry", [
    r"re:.*self_attn\.q_proj$", "model.layers.*.self_attn.q_proj", "*.q_proj", "re:model.layers.0.self_attn"])
def test_fp8_tensor_listed_by_a_pattern_is_refused(qwen2, entry, tmp_path):
    """The listed q_proj is stored FP8: refused, as with its plain name (the pattern used to match nothing)."""
    directory = copy_of(qwen2, tmp_path)
    edit_config(directory, lambda c: c["quantization_config"]["modules_to_not_convert"].append(entry))
    with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.self_attn\.[qkvo]_proj\.weight' in .* is "
                                              r"float8_e4m3fn, but quantization_config.modules_to_not_convert lists"):
        load_model(str(directory), dtype=torch.float32)


def test_ignored_layers_beside_modules_to_not_convert_are_read(qwen2, tmp_path):
    """vLLM reads ignored_layers first, transformers modules_to_not_convert: a module either lists is high
    precision for one of them. ignored_layers was read only when modules_to_not_convert was empty."""
    directory = copy_of(qwen2, tmp_path)
    edit_config(directory, lambda c: c["quantization_config"].update(ignored_layers=[Q.removesuffix(".weight")]))
    with pytest.raises(CheckpointError, match=rf"'{Q}' in .* is float8_e4m3fn, but quantization_config"):
        load_model(str(directory), dtype=torch.float32)


def test_patterns_naming_the_high_precision_modules_load(qwen2, tmp_path):
    """The qwen2 fixture's bf16 modules listed by pattern: the same model as listed by name."""
    directory = copy_of(qwen2, tmp_path)
    edit_config(directory, lambda c: c["quantization_config"].update(
        modules_to_not_convert=["re:.*lm_head", r"re:.*mlp\.gate$"],
        ignored_layers=["model.layers.*.mlp.shared_expert_gate"]))
    assert torch.equal(logits(directory), logits(qwen2))


@pytest.mark.parametrize("field", ["modules_to_not_convert", "ignored_layers"])
@pytest.mark.parametrize("entry, why", [
    (r".*mlp\.gate$", "is neither a module name"),  # a bare regular expression: vLLM reads it literally
    ("model.layers.[0-3].mlp.gate", "is neither a module name"),
    ("lm_head|mlp.gate", "is neither a module name"),
    ("", "is neither a module name"),
    ("re:model.layers.(", "is not a valid regular expression"),
    ("re:", "is an empty regular expression"),
])
def test_unknown_entry_forms_are_refused(field, entry, why):
    with pytest.raises(QuantConfigError, match=rf"quantization_config\.{field} entry .* {why}"):
        parse_quantization_config(dict(quant_method="fp8", fmt="e4m3", activation_scheme="dynamic",
                                       weight_block_size=[128, 128], **{field: ["lm_head", entry]}))


def test_unknown_entry_refused_at_start_up_naming_config_json(qwen2, tmp_path):
    directory = copy_of(qwen2, tmp_path)
    edit_config(directory, lambda c: c["quantization_config"]["modules_to_not_convert"].append(".*gate$"))
    with pytest.raises(ConfigError, match=r"config\.json: quantization_config\.modules_to_not_convert entry "
                                          r"'\.\*gate\$' is neither"):
        load_model(str(directory), dtype=torch.float32)


# --- tied embeddings stored under the head's name ------------------------------------------------------------------

@pytest.fixture(scope="module")
def tied():
    return make_hf_model("qwen3_moe", seed=23, tie_word_embeddings=True)


def test_tied_checkpoint_storing_only_the_head_loads_tied(tied, tmp_path):
    """tie_word_embeddings with the shared matrix stored as lm_head.weight (no model.embed_tokens.weight): we
    refused it; transformers ties the other way (tie_weights swaps source and target). Same logits as HF, and as
    transformers' own load of this checkpoint."""
    import transformers

    directory = save_checkpoint(tied, tmp_path / "head_only")
    rewrite_safetensors(directory / "model.safetensors",
                        lambda t: t.__setitem__("lm_head.weight", t.pop("model.embed_tokens.weight")))
    stored = load_file(directory / "model.safetensors")
    assert "lm_head.weight" in stored and "model.embed_tokens.weight" not in stored
    ours, _ = load_model(str(directory), dtype=torch.float32)
    assert ours.lm_head is None and torch.equal(ours.model.embed_tokens.weight, tied.model.embed_tokens.weight)
    actual = PagedRunner(ours).step({"s": PROMPT}, all_logits=True)["s"]
    expected = hf_logits(tied, PROMPT)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32,
                                                               attn_implementation="eager").eval()
    assert torch.equal(hf_logits(theirs, PROMPT), expected)
    assert max_relative_error(actual, expected) < 1e-4


def test_tied_head_only_plan_is_shared_by_the_parallel_loader(tied, tmp_path):
    """The tensor-parallel loader matches the checkpoint against the global model by the same plan_loading: it reads
    lm_head.weight into the (vocabulary-sharded) embeddings."""
    from model.checkpoint import SafetensorsCheckpoint
    from model.families import FAMILIES
    from model.loader import read_config
    from model.parallel.model import meta_model
    from model.weight_map import plan_loading, unused_keys

    directory = save_checkpoint(tied, tmp_path / "head_only")
    rewrite_safetensors(directory / "model.safetensors",
                        lambda t: t.__setitem__("lm_head.weight", t.pop("model.embed_tokens.weight")))
    config, checkpoint = read_config(directory), SafetensorsCheckpoint(directory)
    renames = FAMILIES[config.model_type].checkpoint_renames
    global_model = meta_model(config)
    plan = plan_loading(global_model, checkpoint, renames, unused_keys(config, checkpoint, renames))
    names = {id(p): n for n, p in global_model.named_parameters()}
    assert [(names[id(p)], key) for p, _, key in plan if key == "lm_head.weight"] == [
        ("model.embed_tokens.weight", "lm_head.weight")]


def test_tied_checkpoint_storing_neither_is_refused(tied, tmp_path):
    directory = save_checkpoint(tied, tmp_path / "neither")
    rewrite_safetensors(directory / "model.safetensors", lambda t: t.pop("model.embed_tokens.weight"))
    with pytest.raises(CheckpointError, match=r"has no tensor 'model\.embed_tokens\.weight' nor 'lm_head\.weight' "
                                              r"\(tie_word_embeddings\)"):
        load_model(str(directory), dtype=torch.float32)

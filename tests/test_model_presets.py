"""Presets: the named real shapes match the published parameter counts, need `random_weights`, and the embedded
`tiny` model runs on the CPU with no files at all."""

import json

import pytest
import torch

from model.byte_tokenizer import ByteTokenizer
from model.families import FAMILIES
from model.loader import load_model
from model.presets import PRESETS
from tests.model_fixtures import PagedRunner

# (total, active per token) parameters in billions, as the model cards publish them.
PUBLISHED = {
    "qwen3-30b-a3b": (30.5, 3.3),
    "olmoe-1b-7b": (6.9, 1.3),
    "mixtral-8x7b": (46.7, 12.9),
    "qwen2-moe-a2.7b": (14.3, 2.7),
    "qwen2-57b-a14b": (57.4, 14.2),
    "deepseek-v2-lite": (15.7, 2.4),
    "deepseek-v3": (671.0, 37.0),  # without the MTP layer (the hub's 685B counts it)
    "glm-4.5-air": (106, 12),
    # OpenAI's gpt-oss model card: 20.91B / 116.83B total, 3.61B / 5.13B active not counting the 0.58B embedding
    # table (201088 x 2880), which our count of active parameters includes.
    "gpt-oss-20b": (20.91, 3.61 + 0.58),
    "gpt-oss-120b": (116.83, 5.13 + 0.58),
}
EMBEDDINGS_NOT_ACTIVE = {"glm-4.5-air"}  # its card counts active parameters without the embeddings and LM head
INPUT_EMBEDDING_NOT_ACTIVE = {"deepseek-v2-lite"}  # its card counts them without the input embedding


@pytest.mark.parametrize("name", PUBLISHED)
def test_named_presets_have_the_published_size(name):
    model, tokenizer = load_model(name, random_weights=True, device="meta")  # shapes only, no memory
    c = model.config
    total = sum(p.numel() for p in model.parameters())
    moe_layers = sum(c.is_moe_layer(i) for i in range(c.num_layers))
    idle_experts = moe_layers * (c.num_experts - c.top_k) * 3 * c.hidden_size * c.moe_intermediate_size
    embeddings = (1 if c.tie_word_embeddings else 2) * c.vocab_size * c.hidden_size if name in EMBEDDINGS_NOT_ACTIVE \
        else c.vocab_size * c.hidden_size if name in INPUT_EMBEDDING_NOT_ACTIVE else 0
    published_total, published_active = PUBLISHED[name]
    assert total / 1e9 == pytest.approx(published_total, rel=0.01)
    assert (total - idle_experts - embeddings) / 1e9 == pytest.approx(published_active, rel=0.03)
    assert isinstance(tokenizer, ByteTokenizer) and set(c.eos_token_ids) <= set(tokenizer.eos_token_ids)
    assert c.name == name


def test_every_family_has_a_preset_the_generic_decoder_builds():
    by_family = {PRESETS[name]["model_type"]: name for name in PUBLISHED}
    assert set(by_family) == set(FAMILIES)
    for model_type, name in by_family.items():
        model, _ = load_model(name, random_weights=True, device="meta")
        assert model.config.model_type == model_type
        assert len(model.moe_blocks()) == sum(model.config.is_moe_layer(i) for i in range(model.config.num_layers))


def test_named_presets_need_random_weights():
    with pytest.raises(ValueError, match="has no weights: pass random_weights=True"):
        load_model("olmoe-1b-7b", device="meta")


def test_tiny_runs_on_cpu_and_is_seeded():
    model, tokenizer = load_model("tiny", dtype="auto")
    assert next(model.parameters()).dtype == torch.float32  # "auto" on the CPU
    assert tokenizer.vocab_size == model.config.vocab_size
    again, _ = load_model("tiny", dtype=torch.float32)
    other, _ = load_model("tiny", dtype=torch.float32, seed=1)
    for (name, a), b, c in zip(model.named_parameters(), again.parameters(), other.parameters()):
        assert torch.equal(a, b), name
        assert name.endswith("norm.weight") or not torch.equal(a, c), name
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hello!"}])
    out = PagedRunner(model).greedy(prompt, 12)
    assert out == PagedRunner(again).greedy(prompt, 12) and len(out) == 12
    assert all(0 <= t < tokenizer.vocab_size for t in out)
    assert isinstance(tokenizer.decode(out), str)


def test_expert_load_counts_routed_tokens():
    """Every MoE block adds top_k per token to its device counter (padding rows included)."""
    model, _ = load_model("tiny", dtype=torch.float32)
    runner = PagedRunner(model)
    runner.step({"a": list(range(10)), "b": list(range(5))})
    runner.step({"a": [1], "b": [2]}, pad_to=4)
    for block in model.moe_blocks():
        load = block.experts.expert_load
        assert load.dtype == torch.int64 and load.shape == (8,)
        assert int(load.sum()) == (15 + 4) * 2
        assert (load > 0).sum() > 1


def test_checkpoint_directory_with_random_weights_needs_only_config(tmp_path):
    config = dict(PRESETS["tiny"], hidden_size=32, num_hidden_layers=1)
    (tmp_path / "config.json").write_text(json.dumps(config))
    model, tokenizer = load_model(str(tmp_path), random_weights=True, dtype=torch.float32)
    assert model.config.hidden_size == 32 and model.config.name == tmp_path.name
    assert isinstance(tokenizer, ByteTokenizer)
    assert len(PagedRunner(model).greedy([1, 2, 3], 4)) == 4


def test_dtype_names():
    model, _ = load_model("tiny", dtype="bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.model.rotary_emb.cos_cache.dtype == torch.float32
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        load_model("tiny", dtype="int8")

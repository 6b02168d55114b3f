"""Checkpoint loading: the on-disk layouts we accept (sharded + index, per-expert or fused 3-D experts, Mixtral's
original names, tied embeddings, a tied config with its own head as transformers reads it) and the broken checkpoints
we refuse at start-up with the file and key named (config values in detail: tests/test_config_validation.py)."""

import copy
import json
import pickle
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.checkpoint import CheckpointError
from model.config import ConfigError
from model.loader import load_model
from model.tokenizer import TokenizerError
from tests.model_fixtures import (
    PagedRunner, hf_logits, make_hf_model, make_tokenizer_files, max_relative_error, rewrite_safetensors,
    save_checkpoint,
)

PROMPT = [3, 14, 15, 92, 65, 35, 89, 79, 32]


def edit_config(directory, **fields):
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


def assert_matches_hf(hf, directory):
    ours, _ = load_model(str(directory), dtype=torch.float32)
    actual = PagedRunner(ours).step({"s": PROMPT}, all_logits=True)["s"]
    assert max_relative_error(actual, hf_logits(hf, PROMPT)) < 1e-4


@pytest.fixture(scope="module")
def qwen3():
    return make_hf_model("qwen3_moe", seed=11)


@pytest.fixture
def checkpoint(qwen3, tmp_path):
    """A fresh single-file qwen3_moe checkpoint to break; returns (directory, its safetensors file)."""
    directory = save_checkpoint(qwen3, tmp_path / "ckpt")
    return directory, directory / "model.safetensors"


def test_sharded_checkpoint_with_index(qwen3, tmp_path):
    directory = save_checkpoint(qwen3, tmp_path, max_shard_size="40KB")
    shards = sorted(directory.glob("*.safetensors"))
    assert len(shards) > 2 and (directory / "model.safetensors.index.json").is_file()
    assert_matches_hf(qwen3, directory)


def test_fused_3d_expert_tensors(qwen3, tmp_path):
    """The layout transformers 5 holds in memory: experts.gate_up_proj [E, 2I, H] and experts.down_proj [E, H, I]."""
    directory = save_checkpoint(qwen3, tmp_path)
    (directory / "model.safetensors").unlink()
    state = {k: v.contiguous() for k, v in qwen3.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    assert_matches_hf(qwen3, directory)


def test_mixtral_original_key_names(tmp_path):
    """Published Mixtral checkpoints name the block `block_sparse_moe` and the experts w1/w3/w2."""
    hf = make_hf_model("mixtral", seed=12)
    directory = save_checkpoint(hf, tmp_path)
    names = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}

    def to_original(tensors):
        for key in list(tensors):
            new = key.replace(".mlp.", ".block_sparse_moe.")
            new = re.sub(r"\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.",
                         lambda m: f".experts.{m[1]}.{names[m[2]]}.", new)
            tensors[new] = tensors.pop(key)

    rewrite_safetensors(directory / "model.safetensors", to_original)
    assert "model.layers.0.block_sparse_moe.experts.0.w1.weight" in load_file(directory / "model.safetensors")
    assert_matches_hf(hf, directory)


def test_tied_embeddings(tmp_path):
    hf = make_hf_model("qwen3_moe", seed=13, tie_word_embeddings=True)
    directory = save_checkpoint(hf, tmp_path)
    assert "lm_head.weight" not in load_file(directory / "model.safetensors")
    assert_matches_hf(hf, directory)


def test_tied_config_with_a_distinct_stored_head_keeps_it_as_transformers_does(qwen3, tmp_path, caplog):
    """config.json says tie_word_embeddings but the checkpoint stores its own, different lm_head.weight:
    transformers 5 then does not tie (it warns and keeps the stored head). We used to drop the stored head silently
    and serve the embeddings as the head (logits 1.5 relative error off HF's)."""
    import transformers

    directory = save_checkpoint(qwen3, tmp_path)
    edit_config(directory, tie_word_embeddings=True)
    assert not torch.equal(qwen3.lm_head.weight, qwen3.model.embed_tokens.weight)
    with caplog.at_level("WARNING", logger="model.weight_map"):
        ours, _ = load_model(str(directory), dtype=torch.float32)
    assert "'lm_head.weight'" in caplog.text and "tie_word_embeddings" in caplog.text
    assert ours.lm_head is not None and torch.equal(ours.lm_head.weight, qwen3.lm_head.weight)
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    actual = PagedRunner(ours).step({"s": PROMPT}, all_logits=True)["s"]
    assert max_relative_error(actual, hf_logits(hf, PROMPT)) < 1e-4


def test_tied_config_with_a_stored_copy_of_the_embeddings_stays_tied(tmp_path, caplog):
    hf = make_hf_model("qwen3_moe", seed=13, tie_word_embeddings=True)
    directory = save_checkpoint(hf, tmp_path)
    rewrite_safetensors(directory / "model.safetensors",
                        lambda t: t.__setitem__("lm_head.weight", t["model.embed_tokens.weight"].clone()))
    with caplog.at_level("WARNING", logger="model.weight_map"):
        ours, _ = load_model(str(directory), dtype=torch.float32)
    assert ours.lm_head is None and "lm_head" not in caplog.text


def test_bf16_checkpoint_into_float32_model(tmp_path):
    hf = make_hf_model("qwen3_moe", seed=14)
    with torch.no_grad():
        for p in hf.parameters():  # make every weight exactly representable in bf16
            p.copy_(p.bfloat16().float())
    directory = save_checkpoint(copy.deepcopy(hf).to(torch.bfloat16), tmp_path)
    assert {t.dtype for t in load_file(directory / "model.safetensors").values()} == {torch.bfloat16}
    ours, _ = load_model(str(directory), dtype=torch.float32)
    assert ours.model.norm.weight.dtype == torch.float32
    assert_matches_hf(hf, directory)


@pytest.mark.parametrize(
    "change, pattern",
    [
        (lambda t: t.pop("model.layers.2.self_attn.k_proj.weight"),
         r"no tensor 'model\.layers\.2\.self_attn\.k_proj\.weight'"),
        (lambda t: t.pop("model.layers.0.mlp.experts.5.up_proj.weight"),
         r"no tensor 'model\.layers\.0\.mlp\.experts\.5\.up_proj\.weight'"),
        (lambda t: t.update({"model.layers.0.mlp.bogus.weight": torch.zeros(2)}),
         r"'model\.layers\.0\.mlp\.bogus\.weight' in model\.safetensors"),
        (lambda t: t.update({"model.layers.0.self_attn.o_proj.weight": torch.zeros(64, 63)}),
         r"'model\.layers\.0\.self_attn\.o_proj\.weight' in .*model\.safetensors has shape \(64, 63\), "
         r"expected \(64, 64\)"),
        (lambda t: t.update({"model.norm.weight": torch.ones(64, dtype=torch.int32)}),
         r"'model\.norm\.weight' in .*model\.safetensors has dtype I32"),
        (lambda t: t.update({"model.layers.1.mlp.experts.gate_up_proj": torch.zeros(8, 64, 64)}),
         r"does not use: .*experts\.gate_up_proj"),  # dense layer 1 has no experts
    ],
    ids=["missing", "missing-expert", "extra", "shape", "dtype", "extra-fused"],
)
def test_bad_tensors_fail_naming_key_and_file(checkpoint, change, pattern):
    directory, path = checkpoint
    rewrite_safetensors(path, change)
    with pytest.raises(CheckpointError, match=pattern):
        load_model(str(directory), dtype=torch.float32)


def test_both_expert_layouts_at_once_is_refused(qwen3, checkpoint):
    directory, path = checkpoint
    rewrite_safetensors(path, lambda t: t.update({"model.layers.0.mlp.experts.down_proj": qwen3.state_dict()[
        "model.layers.0.mlp.experts.down_proj"].contiguous()}))
    with pytest.raises(CheckpointError, match=r"does not use: 'model\.layers\.0\.mlp\.experts\.\d+\."):
        load_model(str(directory), dtype=torch.float32)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_file_is_named(checkpoint, damage):
    directory, path = checkpoint
    data = path.read_bytes()
    path.write_bytes(b"\x13\x37" * 50 if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"corrupt safetensors file .*{path.name}"):
        load_model(str(directory), dtype=torch.float32)


def test_index_naming_a_missing_shard(qwen3, tmp_path):
    directory = save_checkpoint(qwen3, tmp_path, max_shard_size="40KB")
    victim = sorted(directory.glob("*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=rf"lists shard '{victim.name}'"):
        load_model(str(directory), dtype=torch.float32)


def test_index_placing_a_key_in_the_wrong_shard(qwen3, tmp_path):
    directory = save_checkpoint(qwen3, tmp_path, max_shard_size="40KB")
    index_path = directory / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    key = next(k for k, v in index["weight_map"].items() if v == shards[0])
    index["weight_map"][key] = shards[1]
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"places '{re.escape(key)}' in {shards[1]}"):
        load_model(str(directory), dtype=torch.float32)


@pytest.mark.parametrize("value", [5, ["model-00001.safetensors"]], ids=["int", "list"])
def test_index_with_a_non_string_shard_name(qwen3, tmp_path, value):
    """Raised a TypeError (PosixPath / int, or an unhashable list) naming neither the index nor the key."""
    directory = save_checkpoint(qwen3, tmp_path, max_shard_size="40KB")
    index_path = directory / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    key = next(iter(index["weight_map"]))
    index["weight_map"][key] = value
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"unreadable checkpoint index .*index\.json.*{re.escape(key)}"):
        load_model(str(directory), dtype=torch.float32)


class _Exploit:
    """Unpickling this writes a marker file: proof that a loader executed pickle."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (shutil.copyfile, (__file__, str(self.marker)))


def test_pickle_checkpoints_are_never_loaded(checkpoint, tmp_path):
    directory, path = checkpoint
    path.unlink()
    marker = tmp_path / "pwned"
    (directory / "pytorch_model.bin").write_bytes(pickle.dumps(_Exploit(marker)))
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors files .*pytorch_model\.bin.*never loaded"):
        load_model(str(directory), dtype=torch.float32)
    assert not marker.exists()


@pytest.mark.parametrize(
    "edit, pattern",
    [
        (lambda c: c.update(model_type="llama"), r"config\.json: unsupported model_type 'llama'"),
        (lambda c: c.update(hidden_size="64"), r"config\.json: .*hidden_size"),
        (lambda c: c.pop("num_hidden_layers"), r"config\.json: config\.json has no 'num_hidden_layers'"),
        (lambda c: c.update(hidden_act="gelu"), r"hidden_act='gelu' is not supported"),
        (lambda c: c.update(rope_parameters={"rope_type": "longrope", "rope_theta": 1e4}), r"rope type 'longrope'"),
        (lambda c: c.update(num_key_value_heads=3), r"not a multiple of num_key_value_heads=3"),
    ],
    ids=["model_type", "type", "missing", "activation", "rope", "heads"],
)
def test_bad_config_fails_naming_the_file(checkpoint, edit, pattern):
    directory, _ = checkpoint
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    edit(config)
    config_path.write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=pattern):
        load_model(str(directory), dtype=torch.float32)


def test_missing_files(checkpoint, tmp_path):
    directory, _ = checkpoint
    (directory / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match=r"no tokenizer\.json in"):
        load_model(str(directory), dtype=torch.float32)
    (directory / "config.json").unlink()
    with pytest.raises(ConfigError, match=r"no config\.json in"):
        load_model(str(directory), dtype=torch.float32)
    with pytest.raises(FileNotFoundError, match="neither a checkpoint directory nor a preset"):
        load_model(str(tmp_path / "nowhere"))


def test_generation_config_eos_ids_are_added(checkpoint):
    directory, _ = checkpoint
    config = json.loads((directory / "config.json").read_text())
    config["eos_token_id"] = 5
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 7]}))
    model, tokenizer = load_model(str(directory), dtype=torch.float32)
    assert model.config.eos_token_ids == (5, 7)
    im_end = tokenizer.encode("<|im_end|>")  # the tokenizer's own eos_token
    assert len(im_end) == 1 and tokenizer.eos_token_ids == [im_end[0], 5, 7]


def test_tokenizer_larger_than_the_model_vocabulary_is_refused(tmp_path):
    hf = make_hf_model("olmoe", seed=15, vocab_size=200)  # the test tokenizer has 300 tokens
    hf.save_pretrained(tmp_path)
    make_tokenizer_files(tmp_path)
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: token .* has id 299, outside the model's vocab_size "
                                             r"200"):
        load_model(str(tmp_path), dtype=torch.float32)


def test_tokenizer_ids_beyond_the_model_vocabulary_are_refused(checkpoint):
    """A tokenizer with a sparse id: its token COUNT (300) fits the model's 320 rows but an id (5000) does not. The
    count was checked, so it loaded and the first prompt holding that token crashed the forward (IndexError on the
    CPU, a device-side assert on CUDA)."""
    directory, _ = checkpoint
    path = directory / "tokenizer.json"
    tokenizer = json.loads(path.read_text())
    vocab = tokenizer["model"]["vocab"]
    token = max(vocab, key=vocab.get)
    vocab[token] = 5000
    path.write_text(json.dumps(tokenizer))
    with pytest.raises(TokenizerError, match=rf"tokenizer\.json: token {re.escape(repr(token))} has id 5000, outside "
                                             rf"the model's vocab_size 320"):
        load_model(str(directory), dtype=torch.float32)

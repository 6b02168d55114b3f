"""GLM-4.5 (`glm4_moe`) beyond the shared parity suite (tests/test_model_parity.py runs the tiny GLM of
tests/model_fixtures.py through every parity test): the GLM-4.5-Air shape of options, YaRN on the partial rotary,
the MTP layer skipped at load, config errors, and greedy tokens through the engine and over HTTP equal to
transformers' `generate`."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.checkpoint import CheckpointError
from model.config import ConfigError
from model.engine import EngineConfig, LLMEngine, SamplingParams
from model.loader import load_model
from tests.engine_fixtures import GREEDY, run, tokens_of
from tests.model_fixtures import (
    PagedRunner, completion_text, hf_greedy, hf_logits, make_hf_model, max_relative_error, save_checkpoint,
)
from tests.service_fixtures import ServerProcess

PROMPT = [5, 77, 203, 19, 150, 8, 66, 301, 42, 42, 7, 260, 99]
# GLM-4.5-Air's options: no q/k norm, one expert group, no routed scaling, one shared expert, QKV biases
AIR_LIKE = dict(use_qk_norm=False, n_group=1, topk_group=1, routed_scaling_factor=1.0, n_shared_experts=1)


def test_air_like_options_match_hf(tmp_path):
    hf = make_hf_model("glm4_moe", seed=41, **AIR_LIKE)
    ours, _ = load_model(str(save_checkpoint(hf, tmp_path)), dtype=torch.float32)
    c = ours.config
    assert (c.qk_norm, c.n_group, c.shared_expert_intermediate_size, c.rotary_dim) == ("none", 1, 32, 8)
    assert max_relative_error(PagedRunner(ours).step({"s": PROMPT}, all_logits=True)["s"], hf_logits(hf, PROMPT)) < 1e-4
    assert PagedRunner(ours).greedy(PROMPT, 32, chunk=5) == hf_greedy(hf, PROMPT, 32)


def test_yarn_on_the_partial_rotary_matches_hf(tmp_path):
    """YaRN's frequencies are computed over the rotary channels (head_dim * partial_rotary_factor), as transformers
    does; a wrong dimension changes every frequency."""
    rope = {"rope_type": "yarn", "rope_theta": 1000.0, "factor": 4.0, "original_max_position_embeddings": 64,
            "partial_rotary_factor": 0.5}
    hf = make_hf_model("glm4_moe", seed=42, rope_parameters=rope)
    ours, _ = load_model(str(save_checkpoint(hf, tmp_path)), dtype=torch.float32)
    assert ours.config.rope_yarn is not None and ours.config.rotary_dim == 8
    assert max_relative_error(PagedRunner(ours).step({"s": PROMPT}, all_logits=True)["s"], hf_logits(hf, PROMPT)) < 1e-4


def add_mtp_layer(directory, num_layers: int) -> int:
    """Append GLM-4.5's MTP layer tensors (model.layers.<num_layers>.*, as the published checkpoints store them) to
    the checkpoint; returns how many."""
    path = directory / "model.safetensors"
    tensors = load_file(path)
    prefix = f"model.layers.{num_layers}."
    last = f"model.layers.{num_layers - 1}."
    mtp = {prefix + k[len(last):]: v.clone() for k, v in tensors.items() if k.startswith(last)}
    hidden = tensors["model.embed_tokens.weight"].shape[1]
    mtp |= {prefix + "eh_proj.weight": torch.randn(hidden, 2 * hidden), prefix + "enorm.weight": torch.ones(hidden),
            prefix + "hnorm.weight": torch.ones(hidden), prefix + "shared_head.norm.weight": torch.ones(hidden)}
    save_file({**tensors, **mtp}, path, metadata={"format": "pt"})
    return len(mtp)


def test_mtp_layer_is_skipped_at_load(tmp_path, caplog):
    hf = make_hf_model("glm4_moe", seed=43)
    directory = save_checkpoint(hf, tmp_path)
    assert hf.config.num_nextn_predict_layers == 1
    added = add_mtp_layer(directory, hf.config.num_hidden_layers)
    with caplog.at_level("INFO", logger="model.loader"):
        ours, _ = load_model(str(directory), dtype=torch.float32)
    assert f"skipping the 1 multi-token-prediction layer(s) after layer 2 ({added} tensors)" in caplog.text
    assert len(ours.model.layers) == 3
    assert max_relative_error(PagedRunner(ours).step({"s": PROMPT}, all_logits=True)["s"], hf_logits(hf, PROMPT)) < 1e-4
    config = json.loads((directory / "config.json").read_text())
    config["num_nextn_predict_layers"] = 0  # without the field, those tensors are unexpected, as for any family
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"tensors the model does not use: 'model\.layers\.3\."):
        load_model(str(directory), dtype=torch.float32)


@pytest.mark.parametrize("edit, pattern", [
    (dict(scoring_func="softmax"), r"scoring_func='softmax' is not supported for glm4_moe"),
    (dict(n_group=2, topk_group=3), r"routing: topk_group=3 must be in \[1, n_group=2\]"),
    (dict(n_group=3), r"routing: n_group=3 must divide the number of experts 8"),
    (dict(partial_rotary_factor=0.1, rope_parameters={"rope_type": "default", "rope_theta": 1e4}),
     r"partial_rotary_factor=0.1 must give an even"),
    (dict(first_k_dense_replace=-1), r"first_k_dense_replace must be a non-negative integer"),
    (dict(routed_scaling_factor=0), r"routed_scaling_factor must be a positive number"),
    (dict(routed_scaling_factor=float("nan")), r"routed_scaling_factor must be a positive number"),
])
def test_bad_glm_config_names_the_field(tmp_path, edit, pattern):
    directory = save_checkpoint(make_hf_model("glm4_moe", seed=44), tmp_path)
    config = json.loads((directory / "config.json").read_text())
    config.update(edit)
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=pattern):
        load_model(str(directory), dtype=torch.float32)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    hf = make_hf_model("glm4_moe", seed=45)
    return hf, save_checkpoint(hf, tmp_path_factory.mktemp("glm"))


def test_engine_greedy_equals_generate(checkpoint):
    """Continuous batching with chunked prefill and a small KV cache: each request's 32 greedy tokens equal HF's."""
    hf, directory = checkpoint
    engine = LLMEngine(EngineConfig(model=str(directory), dtype="float32", block_size=4, num_kv_blocks=64,
                                    max_num_batched_tokens=16, max_num_seqs=4))
    prompts = [PROMPT, PROMPT[4:], [11, 12, 13], [300, 2, 250, 17, 99, 5, 5, 5, 140]]
    requests = {f"g{i}": (p, SamplingParams(max_tokens=32, **GREEDY)) for i, p in enumerate(prompts)}
    outputs = run(engine, requests)
    for rid, (prompt, _) in requests.items():
        assert tokens_of(outputs[rid]) == hf_greedy(hf, prompt, 32), rid


def test_http_greedy_equals_generate(checkpoint):
    import httpx

    hf, directory = checkpoint
    from model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(directory, "glm")
    expected = [completion_text(tokenizer, p, hf_greedy(hf, p, 32)) for p in (PROMPT, PROMPT[6:])]
    assert all(expected)
    server = ServerProcess(["--model", str(directory), "--device", "cpu", "--dtype", "float32",
                            "--max-model-len", "128", "--served-model-name", "glm"])
    try:
        server.wait_healthy()
        for prompt, text in zip((PROMPT, PROMPT[6:]), expected):
            response = httpx.post(server.base_url + "/v1/completions", timeout=300, json=dict(
                model="glm", prompt=prompt, max_tokens=32, temperature=0, ignore_eos=True))
            assert response.status_code == 200, response.text
            assert response.json()["usage"]["completion_tokens"] == 32
            assert response.json()["choices"][0]["text"] == text
    finally:
        server.stop()

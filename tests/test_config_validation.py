"""config.json and generation_config.json values that would make a wrong or broken model: refused by the config
parser (model/config.py, model/families.py) as a ConfigError naming the file and the field, before any weight is
read. Booleans must be JSON booleans ("false" is truthy), numbers JSON numbers in range."""

import json

import pytest

from model.config import ConfigError
from model.loader import read_config
from tests.deepseek_fixtures import TINY_DEEPSEEK, deepseek_config
from tests.model_fixtures import hf_config


def config_dir(tmp_path, family: str, **fields):
    """A directory holding only the config.json of the tiny `family` model (or DeepSeek variant), with `fields` set
    (None: removed)."""
    (deepseek_config(family) if family in TINY_DEEPSEEK else hf_config(family)).save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    config = json.loads(path.read_text())
    for key, value in fields.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))
    return tmp_path


def refused(directory, field: str, file: str = "config.json"):
    with pytest.raises(ConfigError, match=rf"{file}: .*{field}") as info:
        read_config(directory)
    return str(info.value)


def test_the_tiny_configs_are_accepted(tmp_path):
    """The baseline the refusals below depart from."""
    config = read_config(config_dir(tmp_path, "qwen3_moe"))
    assert config.rope_theta > 0 and config.norm_topk_prob is True and config.tie_word_embeddings is False


@pytest.mark.parametrize("family, field", [
    ("qwen3_moe", "tie_word_embeddings"),
    ("qwen3_moe", "norm_topk_prob"),
    ("qwen3_moe", "attention_bias"),
    ("qwen2_moe", "qkv_bias"),
    ("qwen2_moe", "use_sliding_window"),
    ("glm4_moe", "use_qk_norm"),
    ("gpt_oss", "attention_bias"),
    ("v3-yarn", "rope_interleave"),
    ("v2-lite", "attention_bias"),
])
def test_string_booleans_are_refused(tmp_path, family, field):
    """bool("false") is True: a boolean written as a string would flip the model silently
    (tie_word_embeddings="false" tied the head and dropped the stored lm_head.weight)."""
    message = refused(config_dir(tmp_path, family, **{field: "false"}), field)
    assert "true or false" in message and "'false'" in message




@pytest.mark.parametrize("theta", [0.0, -5.0, "abc"])
@pytest.mark.parametrize("where", ["rope_parameters", "top_level"])
def test_rope_theta_must_be_a_positive_number(tmp_path, theta, where):
    """rope_theta <= 0 made the rotary tables NaN (0**x: inf frequencies, negative**x: NaN); a string raised a bare
    ValueError naming nothing."""
    fields = dict(rope_parameters={"rope_type": "default", "rope_theta": theta}) if where == "rope_parameters" \
        else dict(rope_parameters=None, rope_theta=theta)
    refused(config_dir(tmp_path, "qwen3_moe", **fields), "rope_theta")


@pytest.mark.parametrize("value", [-1.0, 0, "abc", True])
def test_rms_norm_eps_must_be_a_positive_number(tmp_path, value):
    refused(config_dir(tmp_path, "qwen3_moe", rms_norm_eps=value), "rms_norm_eps")


@pytest.mark.parametrize("family, fields, field", [
    ("qwen3_moe", dict(initializer_range="x"), "initializer_range"),
    ("qwen3_moe", dict(initializer_range=-0.02), "initializer_range"),
    ("glm4_moe", dict(routed_scaling_factor="x"), "routed_scaling_factor"),
    ("glm4_moe", dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": "half"}),
     "partial_rotary_factor"),
], ids=["initializer_range", "initializer_range-negative", "routed_scaling_factor", "partial_rotary_factor"])
def test_non_numeric_float_fields_are_config_errors(tmp_path, family, fields, field):
    """float("abc") raised a bare ValueError ("could not convert string to float"): no file, no field."""
    refused(config_dir(tmp_path, family, **fields), field)


@pytest.mark.parametrize("clip", [-2.0, 0.0, "2.0"], ids=["negative", "zero", "string"])
def test_olmoe_clip_qkv_must_be_positive(tmp_path, clip):
    """A negative clip clamped every q/k/v to -|clip| (garbage); a string loaded and every forward then failed."""
    refused(config_dir(tmp_path, "olmoe", clip_qkv=clip), "clip_qkv")


def test_olmoe_clip_qkv_null_means_no_clipping(tmp_path):
    assert read_config(config_dir(tmp_path, "olmoe", clip_qkv=None)).clip_qkv is None


@pytest.mark.parametrize("family, window", [("mixtral", True), ("mixtral", 0), ("mixtral", "4096"),
                                            ("gpt_oss", True)])
def test_sliding_window_must_be_a_positive_integer(tmp_path, family, window):
    """sliding_window=true passed `isinstance(.., int)` and became a window of one token."""
    refused(config_dir(tmp_path, family, sliding_window=window), "sliding_window")


@pytest.mark.parametrize("field", ["num_hidden_layers", "num_experts_per_tok", "vocab_size"])
def test_true_is_not_the_integer_one(tmp_path, field):
    refused(config_dir(tmp_path, "qwen3_moe", **{field: True}), field)


@pytest.mark.parametrize("heads", [0, -4, True])
def test_attention_heads_must_be_positive(tmp_path, heads):
    """hidden_size // num_attention_heads ran before any check: ZeroDivisionError."""
    refused(config_dir(tmp_path, "qwen3_moe", head_dim=None, num_attention_heads=heads), "num_attention_heads")


def test_zero_key_value_heads_is_refused(tmp_path):
    """0 used to fall back to num_attention_heads (`or heads`), hiding the nonsense."""
    refused(config_dir(tmp_path, "qwen3_moe", num_key_value_heads=0), "num_key_value_heads")


@pytest.mark.parametrize("family, fields, field", [
    ("qwen2_moe", dict(shared_expert_intermediate_size=-40), "shared_expert_intermediate_size"),
    ("qwen2_moe", dict(shared_expert_intermediate_size="40"), "shared_expert_intermediate_size"),
    ("glm4_moe", dict(n_shared_experts=-1), "n_shared_experts"),
    ("glm4_moe", dict(n_shared_experts=1.5), "n_shared_experts"),
    ("v2-lite", dict(n_shared_experts=-2), "n_shared_experts"),
], ids=["qwen2-negative", "qwen2-string", "glm-negative", "glm-fraction", "deepseek-negative"])
def test_shared_expert_size_is_validated(tmp_path, family, fields, field):
    """Never checked before: building the model failed deep in torch ("Trying to create tensor with negative
    dimension", or a TypeError from model/layers/linear.py)."""
    refused(config_dir(tmp_path, family, **fields), field)


def test_absurd_max_position_embeddings_is_refused(tmp_path):
    """The rotary tables are allocated for every position up front: 2**40 positions asked the allocator for 4 TiB,
    whose error named neither the file nor the field."""
    refused(config_dir(tmp_path, "qwen3_moe", max_position_embeddings=2**40), "max_position_embeddings")


def test_eos_token_id_outside_the_vocabulary_is_refused(tmp_path):
    """An EOS id past the embedding rows can never be generated: generation would never stop on it."""
    message = refused(config_dir(tmp_path, "qwen3_moe", eos_token_id=99999), "eos_token_id")
    assert "vocab_size 320" in message


def test_generation_config_that_is_not_an_object(tmp_path):
    """read_config called .get on whatever generation_config.json held: AttributeError for a list."""
    directory = config_dir(tmp_path, "qwen3_moe")
    (directory / "generation_config.json").write_text("[1, 2]")
    refused(directory, "JSON object", file="generation_config.json")


@pytest.mark.parametrize("eos", [[5, -1], "5", 99999, True], ids=["negative", "string", "outside", "bool"])
def test_bad_generation_config_eos_names_generation_config(tmp_path, eos):
    """Such ids were blamed on config.json (negative), or silently ignored (a string)."""
    directory = config_dir(tmp_path, "qwen3_moe")
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    refused(directory, "eos_token_id", file="generation_config.json")


def test_weight_block_size_that_is_not_a_list_names_the_field(tmp_path):
    """`weight_block_size: 128` was refused as "malformed ... TypeError('int' object is not iterable)"."""
    quant = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": 128}
    refused(config_dir(tmp_path, "qwen3_moe", quantization_config=quant), "weight_block_size=128")

"""benchmarks/bench_api_costs.py serves a random-weight preset with a BPE tokenizer it trains: the server's EOS ids
(the config's and the tokenizer's) must lie inside that vocabulary, or llguidance refuses to index it and every
structured request gets a 400 (found on the H100, 2026-12-06: Qwen3's EOS 151645 against a 59k-token BPE)."""

import argparse
import json

from benchmarks import bench_api_costs
from model.engine.structured_output import compile_grammar
from model.tokenizer import load_tokenizer


def test_the_trained_tokenizer_and_the_preset_config_agree_on_special_tokens(tmp_path):
    args = argparse.Namespace(preset="qwen3-30b-a3b", vocab=400)
    source = bench_api_costs.model_source(args, tmp_path)
    directory = source[source.index("--model") + 1]
    config = json.loads((tmp_path / "qwen3-30b-a3b_bpe400" / "config.json").read_text())
    tokenizer = load_tokenizer(directory)
    eos = sorted({config["eos_token_id"], *tokenizer.eos_token_ids})
    assert max(eos) < 400, eos  # inside the trained vocabulary
    assert config["eos_token_id"] in tokenizer.eos_token_ids  # the config names the tokenizer's own <|im_end|>
    # what the server does at start-up and per constrained request: index the vocabulary, compile a grammar
    grammar = compile_grammar("regex", "[a-z ]{0,16}", tokenizer, int(config["vocab_size"]), eos)
    assert grammar is not None

"""Is a large ours-vs-HF logit difference on a random-weight preset a bug or bf16 noise amplified by depth?

bench_engine.py compares the last-position logits of our engine and HF transformers sharing the same random weights
(both bf16). A bug (a wrong mask, rope, activation) shows from the first layer on; rounding noise in a random net grows
with depth. This probe builds the preset truncated to 1, 2, 4, ... layers and reports the difference at each depth,
for a prompt inside the sliding window and one past it.

    python benchmarks/probe_hf_parity_depth.py --preset gpt-oss-20b --depths 1 2 4 24 --prompt-lens 64 300
"""

import argparse
import gc
import json
from pathlib import Path

import torch

from benchmarks.bench_engine import first_logits_agree, hf_sharing_weights, make_prompts
from model.engine import EngineConfig, LLMEngine
from model.presets import PRESETS


def truncated(preset: dict, layers: int) -> dict:
    config = dict(preset, num_hidden_layers=layers)
    if "layer_types" in config:
        config["layer_types"] = config["layer_types"][:layers]
    return config


def probe(preset: str, depths: list[int], prompt_lens: list[int], gpu_memory_utilization: float) -> list[dict]:
    original = PRESETS[preset]
    rows = []
    prompts = make_prompts(1, max(prompt_lens), original["vocab_size"])
    try:
        for layers in depths:
            PRESETS[preset] = truncated(original, layers)  # bench_engine's HF builder reads the same table
            engine = LLMEngine(EngineConfig(model=preset, random_weights=True, max_num_seqs=4, enforce_eager=True,
                                            gpu_memory_utilization=gpu_memory_utilization))
            hf = hf_sharing_weights(engine, preset)
            for n in prompt_lens:
                with torch.no_grad():
                    diff = first_logits_agree(engine, hf, prompts[0][:n])
                rows.append(dict(preset=preset, layers=layers, prompt_len=n, max_rel_diff=diff))
                print(f"{preset} layers={layers:>3} prompt={n:>4}: max |ours - HF| / max |HF| = {diff:.4g}", flush=True)
            del engine, hf
            gc.collect()
            torch.cuda.empty_cache()
    finally:
        PRESETS[preset] = original
    return rows


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gpt-oss-20b", choices=sorted(PRESETS))
    p.add_argument("--depths", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--prompt-lens", type=int, nargs="+", default=[64, 300])
    p.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    if min(args.depths) < 1 or min(args.prompt_lens) < 1:
        p.error("--depths and --prompt-lens must be >= 1")
    rows = probe(args.preset, args.depths, args.prompt_lens, args.gpu_memory_utilization)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()

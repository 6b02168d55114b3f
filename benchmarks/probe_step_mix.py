#!/usr/bin/env python
"""Which kinds of steps a closed-loop serving workload makes the engine run (issue 20), CPU-runnable: the real
LLMEngine (a random-weight preset, default `tiny`) at a fixed concurrency, each finished request replaced by a new
one `--arrival-delay` steps later (the HTTP round trip of bench_api_costs' clients), with the request fields of
benchmarks/bench_api_costs.py's features.

Why: on the GPU a pure decode step replays a CUDA graph (24.5 ms for Qwen3-30B-A3B at batch 64), while any step
that also prefills runs eagerly and is host-bound (benchmarks/NOTES.md, "Prefill steps"). What a workload costs
per output token depends on how many of its steps are mixed, which its grammar does not decide but its output
lengths do: requests of one length finish together and their replacements prefill together (few mixed steps),
requests of varied lengths finish one or two a step and nearly every step prefills one of their replacements.

Per feature it prints: steps, the share that are pure decode (graph-eligible on the GPU), mixed (decode rows and
prompt tokens), prefill only; prompts per prefilling step; output tokens per step; the mean TTFT in steps (arrival
to the step that returns the first token); the host time of the grammar parts (mask fill, matcher advance) per
step; the output length distribution. `matched_lengths`: plain requests whose max_tokens are the structured_json
requests' output lengths of the same run (drawn in order), the control that separates what the grammar costs from
what its lengths cost. `--gpu-model DECODE_MS MIXED_MS PREFILL_KTOK_S` adds the output throughput these steps
would give on the GPU if a pure decode step took DECODE_MS (a graph replay) and any other step the larger of
MIXED_MS (an eager step's host time) and its GPU work (DECODE_MS for its decode rows plus its prompt tokens at
PREFILL_KTOK_S thousand a second). Session 13's numbers: benchmarks/NOTES.md.

    python benchmarks/probe_step_mix.py [--features off structured_json matched_lengths short_outputs]
        [--tokenizer DIR] [--concurrency 64] [--input-len 512] [--output-len 256] [--steps 600]
        [--gpu-model 24.5 53 85] [--prefill-hold-steps N]
"""

import argparse
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

from benchmarks.bench_api_costs import features
from model.engine import EngineConfig, LLMEngine, SamplingParams
from model.engine.structured_output import compile_grammar
from model.presets import PRESETS

CHOICES = ["off", "structured_json", "structured_regex", "short_outputs", "matched_lengths"]


def constraint(body: dict) -> tuple[str, object] | None:
    if "response_format" in body:
        return "json_schema", body["response_format"]["json_schema"]["schema"]
    if "structured_outputs" in body:
        return "regex", body["structured_outputs"]["regex"]
    return None


class Timed:
    """Wraps obj.name, adding its wall time to `total` (seconds) at each call."""

    def __init__(self, obj, name: str):
        self.total, original = 0.0, getattr(obj, name)

        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.total += time.perf_counter() - t
        setattr(obj, name, wrapper)


def model_with_tokenizer(preset: str, tokenizer_dir: str) -> str:
    """A checkpoint directory: `preset`'s config with the vocabulary size and special ids of `tokenizer_dir`'s
    config.json (bench_api_costs' trained BPE: the masks and the outputs' lengths then follow that vocabulary)."""
    source = Path(tokenizer_dir)
    target = Path(tempfile.mkdtemp(prefix="probe_step_mix_"))
    given = json.loads((source / "config.json").read_text())
    config = dict(PRESETS[preset], **{k: given[k] for k in ("vocab_size", "bos_token_id", "eos_token_id")})
    (target / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, target / name)
    return str(target)


def run_feature(args, name: str, lengths_from: list[int] | None) -> dict:
    c = args.concurrency
    engine = LLMEngine(EngineConfig(model=args.model, random_weights=True, device="cpu", max_num_seqs=c,
                                    max_num_batched_tokens=args.budget, max_model_len=args.input_len + args.output_len,
                                    num_kv_blocks=c * ((args.input_len + args.output_len) // 16 + 2) + 8,
                                    expert_metrics=False, prefill_hold_steps=args.prefill_hold_steps))
    vocab = engine.model_config.vocab_size
    body = features(args.output_len).get(name, {})
    kind_spec = constraint(body)
    max_tokens = body.get("max_tokens", args.output_len)
    rng = random.Random(args.seed)
    lengths = deque(lengths_from or [])
    fill = Timed(engine.sampling.masks, "fill")
    advance = Timed(engine.sampling, "advance_grammars")

    arrived: dict[str, int] = {}  # request id -> the step it arrived before
    ttft_steps: list[int] = []  # steps from arrival to the step that returned its first token

    def new_request(index: int, step: int) -> None:
        arrived[f"r{index}"] = step
        grammar = None
        if kind_spec is not None:  # compiled per request, as the service does (on its tokenizer threads)
            grammar = compile_grammar(*kind_spec, engine.tokenizer, vocab, list(engine.eos_token_ids))
        n = max_tokens
        if name == "matched_lengths":
            n = lengths[0]
            lengths.rotate(-1)
        params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, grammar=grammar)
        engine.add_request(f"r{index}", [rng.randrange(vocab) for _ in range(args.input_len)], params)

    arrivals: dict[int, int] = {}  # step -> requests arriving then
    for i in range(c):
        new_request(i, 0)
    sent = c
    out_lengths, kinds, prompts_per_prefill, step_outputs, prompt_tokens = [], [], [], [], []
    step_s = 0.0
    for step in range(args.steps):
        for _ in range(arrivals.pop(step, 0)):
            new_request(sent, step)
            sent += 1
        t = time.perf_counter()
        out = engine.step()
        step_s += time.perf_counter() - t
        kinds.append(engine._probe_kind)
        prompt_tokens.append(engine._probe_prompt_tokens)
        if engine._probe_kind in ("mixed", "prefill"):
            prompts_per_prefill.append(engine._probe_prompts)
        step_outputs.append(sum(1 for o in out if o.new_token_ids))
        for o in out:
            if o.num_output_tokens == len(o.new_token_ids) and o.new_token_ids and o.request_id in arrived:
                ttft_steps.append(step - arrived.pop(o.request_id))
            if o.finished:
                out_lengths.append(o.num_output_tokens)
                arrivals[step + args.arrival_delay] = arrivals.get(step + args.arrival_delay, 0) + 1
    steps = len(kinds)
    tokens = sum(step_outputs)
    result = dict(feature=name, steps=steps, output_tokens=tokens,
                  decode=kinds.count("decode") / steps, mixed=kinds.count("mixed") / steps,
                  prefill=kinds.count("prefill") / steps, idle=kinds.count("idle") / steps,
                  prompts_per_prefilling_step=statistics.fmean(prompts_per_prefill) if prompts_per_prefill else 0,
                  tokens_per_step=tokens / steps, completed=len(out_lengths),
                  ttft_steps=statistics.fmean(ttft_steps) if ttft_steps else 0,
                  mean_output_len=statistics.fmean(out_lengths) if out_lengths else 0,
                  output_lens=out_lengths, fill_ms_per_step=fill.total * 1e3 / steps,
                  advance_ms_per_step=advance.total * 1e3 / steps, step_ms=step_s * 1e3 / steps)
    if args.gpu_model:  # a pure decode step: DECODE_MS; any other: host-bound at MIXED_MS, or its GPU work
        decode_ms, mixed_ms, prefill_ktok_s = args.gpu_model
        wall = sum(decode_ms if kind == "decode" else 0.0 if kind == "idle" else
                   max(mixed_ms, (decode_ms if kind == "mixed" else 0.0) + tokens_ / prefill_ktok_s)
                   for kind, tokens_ in zip(kinds, prompt_tokens))
        result["modelled_out_tok_s"] = tokens / wall * 1e3
    return result


def instrument_step_kinds() -> None:
    """Records on the engine what each launched step was: `decode` (every row one sampled token: a CUDA-graph
    replay on the GPU), `mixed` (decode rows and prompt chunks: eager), `prefill` (prompt chunks only: eager) or
    `idle`, and how many prompt chunks it ran."""
    original = LLMEngine._forward

    def forward(self, sched, previous):
        decoding = sum(1 for s in sched.scheduled if s.num_new_tokens == 1 and s.seq.num_computed_tokens
                       >= s.seq.num_prompt_tokens)
        self._probe_prompts = len(sched.scheduled) - decoding
        self._probe_prompt_tokens = sched.num_tokens - decoding
        self._probe_kind = "decode" if sched.is_decode else ("mixed" if decoding else "prefill")
        return original(self, sched, previous)

    original_step = LLMEngine.step

    def step(self):
        self._probe_kind, self._probe_prompts, self._probe_prompt_tokens = "idle", 0, 0
        return original_step(self)

    LLMEngine._forward, LLMEngine.step = forward, step


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--tokenizer", help="a directory with tokenizer.json and config.json (vocab_size, eos_token_id), "
                   "e.g. bench_api_costs' <out>/work/qwen3-30b-a3b_bpe100000; default: the preset's own")
    p.add_argument("--features", nargs="+", default=["off", "structured_json", "matched_lengths", "short_outputs"],
                   choices=CHOICES)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--budget", type=int, default=8192, help="max_num_batched_tokens (the CUDA default)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--arrival-delay", type=int, default=2,
                   help="steps between a request's last token and its replacement's arrival (the client's round "
                        "trip, tokenizing and grammar compilation)")
    p.add_argument("--prefill-hold-steps", type=int, default=0, help="the engine's prefill_hold_steps")
    p.add_argument("--gpu-model", type=float, nargs=3, metavar=("DECODE_MS", "MIXED_MS", "PREFILL_KTOK_S"))
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if "matched_lengths" in args.features and "structured_json" not in args.features:
        sys.exit("matched_lengths needs structured_json in the same run (it replays its output lengths)")
    args.model = model_with_tokenizer(args.preset, args.tokenizer) if args.tokenizer else args.preset
    instrument_step_kinds()
    order = sorted(args.features, key=lambda n: n == "matched_lengths")  # after structured_json
    results = {}
    for name in order:
        json_lengths = results["structured_json"]["output_lens"] if name == "matched_lengths" else None
        results[name] = r = run_feature(args, name, json_lengths)
        lens = r["output_lens"] or [0]
        print(f"{name:16s} steps {r['steps']:4d}: decode {r['decode']:5.1%} mixed {r['mixed']:5.1%} prefill-only "
              f"{r['prefill']:5.1%} idle {r['idle']:4.1%} | prompts/prefilling step "
              f"{r['prompts_per_prefilling_step']:4.1f} | out tok/step {r['tokens_per_step']:5.1f} | TTFT "
              f"{r['ttft_steps']:4.1f} steps | "
              f"out len mean {r['mean_output_len']:5.1f} (min {min(lens)}, p50 {statistics.median(lens):.0f}, "
              f"max {max(lens)}, n {r['completed']}) | host ms/step: step {r['step_ms']:6.2f}, mask fill "
              f"{r['fill_ms_per_step']:5.2f}, advance {r['advance_ms_per_step']:5.2f}"
              + (f" | modelled GPU {r['modelled_out_tok_s']:7.1f} out tok/s" if "modelled_out_tok_s" in r else ""),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

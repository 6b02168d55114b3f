#!/usr/bin/env python
"""Host-side cost of structured output per engine step (issue 20), CPU-runnable: N constrained sequences, the
engine's own code for each part, timed separately:

- extras: SequenceSampling.extras — the list building and GrammarMasks.fill (llguidance's thread pool writes one
  bitmask row per constrained sequence); `fill` is the llguidance call alone, with its CPU time / wall time (the
  threads it really used);
- advance: the read-back's grammar work — each sampled token consumed by its sequence's matcher and the
  completion check (SequenceSampling.advance_grammars);
- apply: logit_masks.apply_bitmask on [N, V] float32 logits of this machine (on the GPU it is a few device ops:
  the bytes they move are printed);

Stand-in for the model: each sequence's next token is drawn uniformly among the tokens its mask allows (EOS
excluded while anything else is allowed); a sequence whose grammar completes is replaced by a new request
(compiled again, as the service does per request: matchers deep-copied from one compiled grammar share its lexer
behind one lock, and their masks fill one at a time whatever the pool size). The mean output length per request is
printed: short outputs mean more prefill per output token in a serving benchmark.

    python benchmarks/bench_grammar_masks.py --tokenizer DIR [--constraint structured_json structured_regex]
        [--num-seqs 64] [--steps 150] [--threads N]
DIR holds tokenizer.json (+ tokenizer_config.json) and config.json (vocab_size, eos_token_id), e.g. the model
directory benchmarks/bench_api_costs.py trains (`<out>/work/qwen3-30b-a3b_bpe100000`).
"""

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.bench_api_costs import features
from model.engine import logit_masks
from model.engine.sampling_params import SamplingParams
from model.engine.sampling_state import SequenceSampling
from model.engine.sequence import Sequence
from model.engine.structured_output import compile_grammar, grammar_tokenizer
from model.tokenizer import load_tokenizer


def constraint_of(name: str, output_len: int) -> tuple[str, object]:
    """(kind, spec) of one of bench_api_costs' structured features, as the service compiles it."""
    body = features(output_len)[name]
    if "structured_outputs" in body:
        return "regex", body["structured_outputs"]["regex"]
    return "json_schema", body["response_format"]["json_schema"]["schema"]


class Workload:
    """N sequences under one constraint, replaced by a new request when their grammar completes."""

    def __init__(self, tokenizer, vocab: int, eos: list[int], kind: str, spec, n: int, seed: int):
        self.tokenizer, self.vocab, self.eos, self.kind, self.spec = tokenizer, vocab, eos, kind, spec
        self.rng = random.Random(seed)
        self.compile_s: list[float] = []
        self.lengths: list[int] = []  # output tokens of each completed request
        self.count = 0
        self.seqs = [self.new_sequence() for _ in range(n)]

    def new_sequence(self) -> Sequence:
        started = time.perf_counter()
        grammar = compile_grammar(self.kind, self.spec, self.tokenizer, self.vocab, self.eos)
        self.compile_s.append(time.perf_counter() - started)
        self.count += 1
        seq = Sequence(f"r{self.count}", [1, 2, 3], SamplingParams(max_tokens=1 << 20, grammar=grammar), self.count)
        seq.matcher = grammar.new_matcher()
        return seq

    def choose(self, masks: np.ndarray) -> list[int]:
        """A token each mask row allows (uniformly; EOS only when nothing else is allowed)."""
        bits = np.unpackbits(masks.view(np.uint8), axis=1, bitorder="little")[:, : self.vocab]  # [N, V]
        bits[:, self.eos] = 0
        tokens = []
        for row in bits:
            allowed = np.flatnonzero(row)
            tokens.append(int(allowed[self.rng.randrange(len(allowed))]) if len(allowed) else self.eos[0])
        return tokens


def run(args, tokenizer, vocab: int, eos: list[int], name: str) -> dict:
    kind, spec = constraint_of(name, args.output_len)
    sampling = SequenceSampling(vocab, torch.device("cpu"), args.num_seqs, eos)
    if args.threads:
        sampling.masks.num_threads = args.threads  # before the pool starts (on the first fill)
    work = Workload(tokenizer, vocab, eos, kind, spec, args.num_seqs, args.seed)
    times = {"extras": [], "fill": [], "fill_cpu": [], "advance": [], "apply": []}
    logits = torch.randn(args.num_seqs, vocab)
    fill = sampling.masks.fill
    timed_fill: dict[str, float] = {}

    def fill_timed(*a, **k):  # the llguidance part of extras, timed from inside it
        t, c = time.perf_counter(), time.process_time()
        out = fill(*a, **k)
        timed_fill.update(wall=time.perf_counter() - t, cpu=time.process_time() - c)
        return out

    sampling.masks.fill = fill_timed
    for step in range(args.warmup + args.steps):
        seqs = work.seqs
        t1 = time.perf_counter()
        extras = sampling.extras(seqs)
        t2 = time.perf_counter()
        edited = logits.clone()
        t3 = time.perf_counter()
        logit_masks.apply_bitmask(edited, extras.grammar_rows, extras.grammar_bitmask)
        t4 = time.perf_counter()
        tokens = work.choose(extras.grammar_bitmask.numpy())
        for seq, token in zip(seqs, tokens):
            seq.token_ids.append(token)
        t5 = time.perf_counter()
        done = sampling.advance_grammars(list(zip(seqs, tokens)))
        t6 = time.perf_counter()
        for i, seq in enumerate(seqs):
            if seq in done:
                work.lengths.append(seq.num_tokens - seq.num_prompt_tokens)
                work.seqs[i] = work.new_sequence()
        if step >= args.warmup:
            for key, value in (("fill", timed_fill["wall"]), ("fill_cpu", timed_fill["cpu"]), ("extras", t2 - t1),
                               ("apply", t4 - t3), ("advance", t6 - t5)):
                times[key].append(value)
    ms = {k: 1e3 * statistics.fmean(v) for k, v in times.items()}
    return {"constraint": name, "kind": kind, "num_seqs": args.num_seqs, "steps": args.steps,
            "threads": sampling.masks.num_threads, "ms_per_step": ms,
            "fill_p90_ms": 1e3 * statistics.quantiles(times["fill"], n=10)[-1],
            "fill_cpu_per_wall": ms["fill_cpu"] / ms["fill"], "us_per_mask": 1e3 * ms["fill"] / args.num_seqs,
            "us_per_advance": 1e3 * ms["advance"] / args.num_seqs,
            "compile_ms_mean": 1e3 * statistics.fmean(work.compile_s[args.num_seqs:] or work.compile_s),
            "requests_completed": len(work.lengths),
            "mean_output_tokens": statistics.fmean(work.lengths) if work.lengths else None}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer", required=True, help="directory with tokenizer.json and config.json")
    p.add_argument("--constraint", nargs="+", default=["structured_json", "structured_regex"],
                   choices=["structured_json", "structured_regex"])
    p.add_argument("--num-seqs", type=int, default=64)
    p.add_argument("--steps", type=int, default=150, help="timed steps (the regex's requests complete after ~140)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--output-len", type=int, default=256, help="bench_api_costs' --output-len (the regex bound)")
    p.add_argument("--threads", type=int, default=0,
                   help="llguidance pool threads (0: the engine's, structured_output.mask_threads)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the results here")
    return p.parse_args(argv)


def bitmask_traffic_bytes(num_rows: int, vocab: int) -> dict:
    """Device memory traffic (reads + writes) of logit_masks.apply_bitmask for `num_rows` constrained rows of
    `vocab` float32 logits: `before` is the int32 shift-and-mask with an index_select / index_copy round trip it
    replaced (issue 20), `all_rows` / `some_rows` the byte expansion with every row constrained (in place) or not."""
    words = (vocab + 31) // 32
    logits, bools, packed = num_rows * vocab * 4, num_rows * vocab, num_rows * words * 4
    expanded32 = num_rows * words * 32 * 4  # int32 [G, W, 32]
    before = packed + expanded32 + (expanded32 + bools) + 2 * bools + 2 * logits + (2 * logits + bools) + 2 * logits
    expand = packed + 3 * 8 * packed  # bytes in, uint8 [G, 4W, 8] AND out, compare in, bool out
    all_rows = packed + expand + (2 * logits + bools)  # H2D, expansion, in-place masked_fill
    some_rows = all_rows + 4 * logits  # + index_select and index_copy
    mb = lambda b: round(b / 1e6, 1)  # noqa: E731
    return {"before_MB": mb(before), "all_rows_MB": mb(all_rows), "some_rows_MB": mb(some_rows)}


def main(argv=None) -> int:
    args = parse_args(argv)
    directory = Path(args.tokenizer)
    config = json.loads((directory / "config.json").read_text())
    vocab = int(config["vocab_size"])
    tokenizer = load_tokenizer(directory)
    eos = sorted({int(config["eos_token_id"]), *tokenizer.eos_token_ids})  # the engine's: config's + tokenizer's
    started = time.perf_counter()
    grammar_tokenizer(tokenizer, vocab, eos)
    print(f"vocabulary indexed in {time.perf_counter() - started:.2f} s (V={vocab}, tokenizer "
          f"{tokenizer.vocab_size if hasattr(tokenizer, 'vocab_size') else '?'} tokens)", flush=True)
    results = []
    for name in args.constraint:
        r = run(args, tokenizer, vocab, eos, name)
        results.append(r)
        ms = r["ms_per_step"]
        print(f"{name}: {args.num_seqs} seqs, {r['threads']} threads, ms/step: extras {ms['extras']:.2f} (fill "
              f"{ms['fill']:.2f}, p90 {r['fill_p90_ms']:.2f}, cpu/wall {r['fill_cpu_per_wall']:.2f}) advance "
              f"{ms['advance']:.3f} apply(cpu) {ms['apply']:.2f} | {r['us_per_mask']:.0f} us/mask, "
              f"{r['us_per_advance']:.1f} us/advance | compile {r['compile_ms_mean']:.1f} ms/request | "
              f"{r['requests_completed']} requests done, mean {r['mean_output_tokens'] or 0:.1f} output tokens",
              flush=True)
    traffic = bitmask_traffic_bytes(args.num_seqs, vocab)
    print(f"apply_bitmask on the device moves (MB, reads + writes): {traffic}")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "device_bytes": traffic}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""What issue 20's API features cost under load (GPU): serving output throughput at one concurrency (default 64)
with a feature on vs off, on one server, in interleaved order (off, on, on, off per feature) so warm-up and drift
fall on both sides alike. Target: each costs <= 10%.

Features (request fields added by the load generator's --extra-body, service/loadgen/):
- logprobs: `logprobs: 5` (the device log_softmax + top-5, read back with the sampled ids);
- structured_regex: a regex every token of the run satisfies (`[a-z ]{0,N}`): a grammar mask on every step of every
  sequence, and the read-back before sampling that a grammar needs, without outputs ending early (N = 32 x
  --output-len: no trained token is longer than 32 bytes; with 4 x, as until 2026-12-06, a stand-in drawing allowed
  tokens at random completed it after ~144 of 256 tokens, benchmarks/bench_grammar_masks.py);
- structured_json: a JSON schema (objects of bounded strings and numbers); with random weights outputs end once
  the schema is complete, so its requests are shorter: compare its per-token numbers (TPOT), not only throughput;
- short_outputs: no constraint, `max_tokens` an eighth of --output-len (32 of 256: about the JSON schema's requests,
  33 tokens on average with a stand-in drawing allowed tokens at random, benchmarks/bench_grammar_masks.py). Not a
  control for structured_json after all: requests of one length finish in the same step and their replacements
  prefill together, while JSON's lengths vary, so one or two requests finish nearly every step and nearly every
  step prefills (eagerly, host-bound) a replacement (benchmarks/probe_step_mix.py; NOTES.md, session 13);
- matched_lengths: no constraint, each request's `max_tokens` one of the output lengths structured_json's requests
  had in this run (in order): the same lengths without the grammar. structured_json's cost minus this one is what
  the grammar itself costs; it runs after structured_json (which it needs).

The mask cost depends on the vocabulary: presets use the 256-byte tokenizer, so by default a byte-level BPE
tokenizer of --vocab tokens is trained here (on the Python standard library's sources, offline, ~1 min) and served
with the preset's config and random weights (`--model DIR --random-weights`).

    python benchmarks/bench_api_costs.py --preset qwen3-30b-a3b --level-time-limit-s 20 --out benchmarks/results
                                                                                     (~8 min on an H100)
    python benchmarks/bench_api_costs.py --preset tiny --device cpu --quick --out /tmp/costs   (CPU smoke run)
"""

import argparse
import asyncio
import itertools
import json
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import httpx

from model.presets import PRESETS
from service.arg_types import positive_int
from service.loadgen.client import run_level
from service.loadgen.dataset import PromptSpec, random_token_prompts
from service.loadgen.processes import default_client_processes
from service.loadgen.report import summarize

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = {"type": "object", "properties": {"title": {"type": "string", "maxLength": 40},
                                           "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
                                           "tags": {"type": "array", "items": {"type": "string", "maxLength": 12},
                                                    "maxItems": 8}},
          "required": ["title", "year", "tags"], "additionalProperties": False}


def features(output_len: int) -> dict:
    return {"logprobs": {"logprobs": 5},
            "structured_regex": {"structured_outputs": {"regex": f"[a-z ]{{0,{32 * output_len}}}"}},
            "structured_json": {"response_format": {"type": "json_schema",
                                                    "json_schema": {"name": "record", "schema": SCHEMA}}},
            "short_outputs": {"max_tokens": max(1, output_len // 8)},  # overrides the load generator's
            "matched_lengths": {}}  # plain requests; their max_tokens come from structured_json's outputs


def matched_length_specs(specs: list[PromptSpec], lengths: list[int]) -> list[PromptSpec]:
    """`specs` with the output lengths `lengths` (cycled, in order): plain requests as long as constrained ones."""
    if not lengths:
        raise RuntimeError("matched_lengths needs structured_json's output lengths: run both features")
    return [PromptSpec(s.prompt, s.prompt_len, max(1, lengths[i % len(lengths)])) for i, s in enumerate(specs)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="qwen3-30b-a3b", choices=list(PRESETS))
    p.add_argument("--device", default="cuda")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--client-processes", type=positive_int, default=default_client_processes(),
                   help="load-generator processes the requests are split over (service/loadgen/processes.py)")
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--level-time-limit-s", type=float, default=25.0)
    p.add_argument("--vocab", type=int, default=100_000, help="BPE tokenizer trained here (0: the byte tokenizer)")
    p.add_argument("--features", nargs="+", default=list(features(1)), choices=list(features(1)))
    p.add_argument("--server-args", default="", help="more `serve` flags, one string (e.g. \"--prefill-hold-steps "
                   "8\" for the A/B of NOTES.md, session 13)")
    p.add_argument("--quick", action="store_true", help="tiny sizes for a smoke run")
    p.add_argument("--out", required=True)
    return p.parse_args(argv)


def train_tokenizer(directory: Path, vocab: int) -> None:
    """A byte-level BPE tokenizer of `vocab` tokens, trained on the standard library's sources (offline)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    files = sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))[:4000]
    texts = (f.read_text(encoding="utf-8", errors="ignore") for f in files)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # max_token_length: unbounded merges over the standard library made a 1497-byte token (a run of CJK test data),
    # which llguidance cannot index; real BPE vocabularies stay far below 64 characters per token
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>", "<|im_start|>",
                                                                            "<|im_end|>"],
                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                         max_token_length=32))
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))


def model_source(args, work: Path) -> list[str]:
    if not args.vocab:
        return ["--preset", args.preset, "--random-weights"]
    directory = work / f"{args.preset}_bpe{args.vocab}"
    directory.mkdir(parents=True, exist_ok=True)
    if not (directory / "tokenizer.json").is_file():
        started = time.perf_counter()
        train_tokenizer(directory, args.vocab)
        print(f"trained a {args.vocab}-token BPE tokenizer in {time.perf_counter() - started:.0f} s", flush=True)
    # the preset's special-token ids (Qwen3's 151645, ...) lie outside the trained vocabulary: point them at its own
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
    config = dict(PRESETS[args.preset], bos_token_id=tok.token_to_id("<|endoftext|>"),
                  eos_token_id=tok.token_to_id("<|im_end|>"))
    (directory / "config.json").write_text(json.dumps(config))
    return ["--model", str(directory), "--random-weights", "--served-model-name", args.preset]


def start_server(args, source: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "service", "serve", *source, "--port", str(port), "--device", args.device,
               "--max-num-seqs", str(args.concurrency), "--max-queue", str(args.concurrency),
               "--max-model-len", str(args.input_len + args.output_len), "--log-level", "warning",
               *shlex.split(args.server_args)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("STATICMOE_")}
    # keep the caller's path too: on the lent GPU machine fastapi & co. come from wheels unpacked onto PYTHONPATH
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()[-3000:]}")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(log.read_text()[-3000:])


async def measure(args, base: str, vocab_size: int) -> dict:
    c = args.concurrency
    seeds = itertools.count()

    def fresh_prompts(n: int = 8 * c):
        """Prompts no earlier level sent: prefix caching is on, as served, and a repeated prompt skips its prefill."""
        return random_token_prompts(n, args.input_len, args.output_len, vocab_size, seed=next(seeds))

    runs: dict[str, list[dict]] = {"off": []}

    json_lengths: list[int] = []  # output tokens of each structured_json request, for matched_lengths

    async def level(name: str, extra: dict | None) -> None:
        level_specs = fresh_prompts()
        if name == "matched_lengths":
            level_specs = matched_length_specs(level_specs, json_lengths)
        run = await run_level(base, level_specs, model=args.preset, max_concurrency=c, extra_body=extra,
                              time_limit_s=args.level_time_limit_s, processes=args.client_processes)
        if name == "structured_json":
            json_lengths.extend(r.output_tokens for r in run.results if r.ok)
        summary = summarize(run)
        runs.setdefault(name, []).append(summary)
        print(f"  {name:17s} {summary['output_throughput']:9.1f} out tok/s  TPOT p50 "
              f"{summary['tpot_ms']['p50'] or 0:6.2f} ms  ok {summary['completed']} failed {summary['failed']}",
              flush=True)

    await run_level(base, fresh_prompts(c), model=args.preset, max_concurrency=c,
                    processes=args.client_processes)  # warm-up (and client processes started), untimed
    for name in args.features:  # builds the grammar engine's vocabulary (~1 s once) outside the timed levels
        warm = summarize(await run_level(base, fresh_prompts(1), model=args.preset,
                                         extra_body=features(args.output_len)[name]))
        if warm["failed"]:  # a feature the server refuses would be timed as 0 tok/s: stop with the reason instead
            raise RuntimeError(f"{name}: the warm-up request failed; the server log says why")
    for name in sorted(args.features, key=lambda n: n == "matched_lengths"):  # after structured_json
        extra = features(args.output_len)[name]
        for which in ("off", name, name, "off"):
            await level(which, None if which == "off" else extra)
    mean = {name: statistics.fmean(r["output_throughput"] for r in rs) for name, rs in runs.items()}
    tpot = {name: statistics.fmean(r["tpot_ms"]["p50"] or 0 for r in rs) for name, rs in runs.items()}
    # a constraint that completes early makes shorter requests, hence more prefill per output token: its cost is
    # partly that, not the masks (issue 20; benchmarks/bench_grammar_masks.py prints the same for a stand-in model)
    out_len = {name: sum(r["total_output_tokens"] for r in rs) / max(1, sum(r["completed"] for r in rs))
               for name, rs in runs.items()}
    return {"runs": runs, "output_tok_s": mean, "tpot_p50_ms": tpot, "mean_output_tokens": out_len,
            "cost": {n: 1 - mean[n] / mean["off"] for n in args.features},
            "tpot_cost": {n: tpot[n] / tpot["off"] - 1 for n in args.features}}


def main(argv=None) -> int:
    args = parse_args(argv)
    if "matched_lengths" in args.features and "structured_json" not in args.features:
        raise SystemExit("--features matched_lengths needs structured_json too (it replays its output lengths)")
    if args.quick:
        args.concurrency, args.input_len, args.output_len, args.level_time_limit_s = 4, 16, 16, 3.0
        args.vocab = min(args.vocab, 2000, int(PRESETS[args.preset]["vocab_size"]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    source = model_source(args, out / "work")
    proc, base = start_server(args, source, out / f"server_api_costs_{args.preset}.log")
    try:
        vocab_size = int(PRESETS[args.preset]["vocab_size"])
        result = asyncio.run(measure(args, base, min(vocab_size, args.vocab or vocab_size)))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
    result.update(preset=args.preset, server_args=args.server_args, concurrency=args.concurrency, input_len=args.input_len,
                  output_len=args.output_len, vocab=args.vocab or "byte", device=args.device,
                  date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                  commit=subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                        text=True).stdout.strip())
    stem = out / f"bench_api_costs_{time.strftime('%Y%m%d-%H%M', time.gmtime())}_{args.preset}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    lines = [f"# API feature costs, {args.preset}, c={args.concurrency} ({result['date']}, {result['commit']})"
             + (f", server {args.server_args}" if args.server_args else ""), "",
             "| feature | out tok/s | vs off | TPOT p50 ms | vs off | output tokens / request |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, tok in result["output_tok_s"].items():
        cost = result["cost"].get(name)
        tpot_cost = result["tpot_cost"].get(name)
        lines.append(f"| {name} | {tok:.1f} | {'' if cost is None else f'{-cost:+.1%}'} | "
                     f"{result['tpot_p50_ms'][name]:.2f} | {'' if tpot_cost is None else f'{tpot_cost:+.1%}'} | "
                     f"{result['mean_output_tokens'][name]:.1f} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

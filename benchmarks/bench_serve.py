#!/usr/bin/env python
"""Serving benchmark (issue 7): our HTTP server under load vs HF transformers `generate` offline, on one GPU.

Per preset (random weights, bf16):
1. `python -m service serve --preset P --random-weights` on loopback; the load generator (service/loadgen/) streams
   /v1/completions at each concurrency (token-exact random prompts of --input-len, exactly --output-len tokens,
   greedy), max(--prompts-per-concurrency x c, --min-prompts) requests per level, no new request after
   --level-time-limit-s; /metrics is scraped during every level. The server is stopped.
2. The metrics overhead at --metrics-concurrency: fresh servers with metrics on and with --no-expert-metrics (no
   MoE timing, no expert counters), in the order on, off, off, on (--overhead-repeats 2), each first warmed by an
   untimed level at that concurrency, so warm-up and drift fall on both sides alike. All runs are scraped alike.
3. In this process, the engine alone: its offline decode step at batch 1 (bench_engine.run_engine) for the TPOT
   comparison; the utilization metric truth at --metrics-concurrency (utilization_truth.py); then HF transformers
   (experts_implementation="grouped_mm") on the same weights and prompts from the same pool (random token ids of
   --input-len) at --hf-batches. The baseline has no HTTP layer: one offline `generate` call per batch, all
   requests at once.
Prompts are never repeated within one server (its warm-up and each level take their own): prefix caching is on, as
served, and a repeated prompt would skip its prefill.
Writes bench_serve_<date>_<preset>.{json,md} and _throughput/_latency PNGs into --out.

FP8: `--quantization none fp8` serves each preset in both precisions, one after the other (`serve --quantization
fp8`: the same random weights quantised at load); FP8 reports are named `<preset>_fp8`, skip the HF baseline (it
runs bf16 weights) and the metrics-off pairs, and the run ends with an FP8 ÷ bf16 line per preset (output tok/s and
TTFT p50 at --metrics-concurrency, KV-cache capacity in tokens of each).

    python benchmarks/bench_serve.py --presets olmoe-1b-7b --out DIR      (~4 min on an H100)
    python benchmarks/bench_serve.py --presets qwen3-30b-a3b --out DIR    (~7 min)
    python benchmarks/bench_serve.py --presets qwen3-30b-a3b --quantization none fp8 --skip-metrics-off --out DIR
    python benchmarks/bench_serve.py --presets tiny --device cpu --quick --out DIR   (CPU smoke run)
"""

import argparse
import asyncio
import gc
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch

from benchmarks.bench_engine import environment, hf_sharing_weights, make_prompts, run_engine, run_hf
from benchmarks.precision_compare import precision_lines
from benchmarks.utilization_truth import markdown_lines, measure_utilization
from model.engine import EngineConfig, LLMEngine
from model.presets import PRESETS
from service.arg_types import positive_float
from service.loadgen.client import run_level
from service.loadgen.dataset import PromptSpec, token_prompts
from service.loadgen.main import int_list, positive_int
from service.loadgen.processes import default_client_processes
from service.loadgen.report import plot_sweep, summarize, table
from service.loadgen.scrape import MetricsScraper

ROOT = Path(__file__).resolve().parents[1]

BASELINE_NOTE = ("HF transformers baseline: offline `generate` (experts_implementation=grouped_mm, sdpa, greedy, "
                 "min_new_tokens = max_new_tokens) on the same weights and prompts, all requests of a batch at once; "
                 "it has no HTTP layer, no streaming and no scheduler, so it is not a like-for-like serving number.")
TARGETS = dict(speedup=15.0, tpot_ratio=1.3, metrics_overhead=0.02, truth_tolerance=0.10)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["olmoe-1b-7b", "qwen3-30b-a3b"], choices=list(PRESETS))
    p.add_argument("--concurrency", type=int_list, default=[1, 16, 64, 256], help="comma list")
    p.add_argument("--client-processes", type=positive_int, default=default_client_processes(),
                   help="load-generator processes the requests are split over (service/loadgen/processes.py)")
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--prompts-per-concurrency", type=float, default=2.0)
    p.add_argument("--min-prompts", type=int, default=8)
    p.add_argument("--level-time-limit-s", type=float, default=30.0)
    p.add_argument("--request-rate", type=positive_float, default=float("inf"),
                   help="Poisson arrivals per second in the timed levels (each still capped at its concurrency); "
                        "default inf: a closed loop. Compares TTFT at equal load: in a closed loop a faster server "
                        "also receives more prompts per second")
    p.add_argument("--metrics-concurrency", type=int, default=64,
                   help="concurrency of the metrics-off comparison and batch of the utilization truth")
    p.add_argument("--scrape-interval-s", type=float, default=2.0)
    p.add_argument("--overhead-repeats", type=int, default=2,
                   help="metrics-overhead server pairs, in ABBA order (on, off, off, on, ...)")
    p.add_argument("--overhead-start", choices=["on", "off"], default="on",
                   help="metrics setting of the first overhead server (off: off, on, on, off, ...)")
    p.add_argument("--hf-batches", type=int_list, default=[1, 16, 64], help="comma list")
    p.add_argument("--hf-output-len", type=int, help="default: --output-len")
    p.add_argument("--truth-output-len", type=int, default=96, help="decode steps of the utilization truth run")
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--server-arg", action="append", default=[], help="extra `serve` flag (repeatable)")
    p.add_argument("--quantization", nargs="+", default=["none"], choices=["none", "fp8"],
                   help="precisions to serve each preset in (fp8: `serve --quantization fp8`)")
    p.add_argument("--startup-timeout-s", type=float, default=900.0)
    for part in ("hf", "metrics-off", "truth", "offline"):
        p.add_argument(f"--skip-{part}", action="store_true")
    p.add_argument("--quick", action="store_true", help="concurrency 1 and --metrics-concurrency, HF at that "
                                                        "batch only, 15 s per level")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--replot", metavar="JSON", help="only redraw the markdown and PNGs of a report JSON")
    args = p.parse_args(argv)
    if args.quick:
        args.concurrency = sorted({1, args.metrics_concurrency})
        args.hf_batches = [args.metrics_concurrency]
        args.level_time_limit_s = min(args.level_time_limit_s, 15.0)
    args.hf_output_len = args.hf_output_len or args.output_len
    return args


def prompts_for(args, concurrency: int) -> int:
    return max(int(args.prompts_per_concurrency * concurrency), args.min_prompts)


# ---- the server subprocess ----------------------------------------------------------------------------------------
class Server:
    def __init__(self, preset: str, args, log_path: Path, metrics: bool, quantization: str = "none"):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}"
        top = max(args.concurrency + [args.metrics_concurrency])
        command = [sys.executable, "-m", "service", "serve", "--preset", preset, "--random-weights",
                   "--host", "127.0.0.1", "--port", str(self.port), "--device", args.device,
                   "--max-num-seqs", str(top), "--max-queue", str(top),
                   "--max-model-len", str(args.input_len + args.output_len),
                   "--max-num-batched-tokens", str(args.max_num_batched_tokens), "--log-level", "warning",
                   "--quantization", quantization,
                   *([] if metrics else ["--no-expert-metrics"]), *args.server_arg]
        env = {k: v for k, v in os.environ.items() if not k.startswith("STATICMOE_") or k == "STATICMOE_COMMIT"}
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.command = command
        self.proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_healthy(self, timeout: float) -> float:
        start = time.perf_counter()
        while time.perf_counter() - start < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                if httpx.get(self.base_url + "/health", timeout=2).status_code == 200:
                    return time.perf_counter() - start
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"server not healthy after {timeout:.0f} s: {self.log_tail()}")

    def log_tail(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        self.log.close()


def prompts_needed(args, levels: list[int], warm_concurrency: int) -> int:
    """Prompts `run_levels` sends to one server: each level's own, then the warm-up's."""
    return sum(prompts_for(args, c) for c in levels) + warm_concurrency


async def run_levels(server: Server, preset: str, specs: list[PromptSpec], levels: list[int], args,
                     warm_concurrency: int = 8, request_rate: float = float("inf")) -> list[dict]:
    """The warm-up and every level send prompts no earlier request of this server sent (prefix caching is on, as
    served: a repeated prompt would skip its prefill): levels take consecutive slices of `specs`, the warm-up its
    tail."""
    warm = [PromptSpec(s.prompt, s.prompt_len, 16) for s in specs[len(specs) - warm_concurrency:]]  # untimed
    await run_level(server.base_url, warm, model=preset, max_concurrency=warm_concurrency,
                    processes=args.client_processes)  # also starts the client processes, untimed
    compiled_in_warm_up = late_specializations(Path(server.log.name))
    out, first = [], 0
    for c in levels:
        level_specs = specs[first: first + prompts_for(args, c)]
        first += len(level_specs)
        async with MetricsScraper(server.base_url, args.scrape_interval_s) as scraper:
            run = await run_level(server.base_url, level_specs, model=preset, max_concurrency=c,
                                  request_rate=request_rate, time_limit_s=args.level_time_limit_s,
                                  processes=args.client_processes)
        summary = summarize(run)
        summary["server_metrics"] = scraper.summary()
        compiled = late_specializations(Path(server.log.name))
        summary["kernel_specializations"] = compiled - compiled_in_warm_up  # compiles this level's steps waited for
        compiled_in_warm_up = compiled
        out.append(summary)
        print(f"  c={c:4d}: {summary['completed']} ok / {summary['failed']} failed, "
              f"{summary['output_throughput']:8.1f} out tok/s, TTFT p50 {summary['ttft_ms']['p50'] or 0:.0f} ms, "
              f"TPOT p50 {summary['tpot_ms']['p50'] or 0:.1f} ms, slots busy {summary['slots_busy'] or 0:.2f}, "
              f"Triton kernels specialised {summary['kernel_specializations']}, "
              f"util gauge {summary['server_metrics'].get('tensor_core_utilization_median')}", flush=True)
        for message, count in summary["errors"].items():
            print(f"    {count} failed: {message}", flush=True)
    return out


def serve_phase(preset, args, specs, levels, metrics: bool, log_dir: Path, warm_concurrency: int = 8,
                tag: str = "", quantization: str = "none", request_rate: float = float("inf")) -> dict:
    name = f"server_{preset}_{'metrics' if metrics else 'no_metrics'}{tag}_{quantization}.log"
    server = Server(preset, args, log_dir / name, metrics, quantization)
    try:
        startup = server.wait_healthy(args.startup_timeout_s)
        print(f"  server ({'metrics on' if metrics else '--no-expert-metrics'}) healthy after {startup:.1f} s",
              flush=True)
        result = dict(command=" ".join(server.command[1:]), startup_s=startup, metrics=metrics,
                      levels=asyncio.run(run_levels(server, preset, specs, levels, args, warm_concurrency,
                                                    request_rate)))
    finally:
        server.stop()
    return result


def late_specializations(server_log: Path) -> int:
    """Triton kernel variants the server needed first after start-up, so far (model/kernels/jit_monitor.py logs
    each once): a step that waited for a compile, or for a load from Triton's disk cache."""
    marker = "Triton specialised a kernel after start-up"
    try:
        return sum(marker in line for line in server_log.read_text(errors="replace").splitlines())
    except OSError:
        return 0


def overhead_phase(preset, args, specs, log_dir: Path) -> dict:
    """Output tok/s at --metrics-concurrency on fresh servers, metrics on/off in ABBA order, each warmed first."""
    mc = args.metrics_concurrency
    first = args.overhead_start == "on"
    order = [m for _ in range(args.overhead_repeats) for m in (first, not first, not first, first)]
    order = order[: 2 * args.overhead_repeats]
    runs = [serve_phase(preset, args, specs, [mc], metrics, log_dir, warm_concurrency=mc, tag=f"_overhead{i}")
            for i, metrics in enumerate(order)]
    mean = lambda on: statistics.fmean(r["levels"][0]["output_throughput"] for r in runs if r["metrics"] == on)  # noqa: E731
    return dict(order=["on" if m else "off" for m in order], runs=runs, on_tok_s=mean(True), off_tok_s=mean(False),
                overhead=1.0 - mean(True) / mean(False), pair_overheads=pair_overheads(runs))


def pair_overheads(runs: list[dict]) -> list[float]:
    """1 − on ÷ off of each consecutive pair of servers (runs 1–2, 3–4, ...: one on and one off each, in ABBA
    order): the spread of the overhead from one pair of fresh servers to the next."""
    out = []
    for a, b in zip(runs[0::2], runs[1::2]):
        tok_s = {run["metrics"]: run["levels"][0]["output_throughput"] for run in (a, b)}
        out.append(1.0 - tok_s[True] / tok_s[False])
    return out


# ---- the engine alone, and the HF baseline --------------------------------------------------------------------
def offline_phase(preset, args, prompts, quantization: str = "none") -> dict:
    out = {}
    engine = LLMEngine(EngineConfig(model=preset, random_weights=True, device=args.device, quantization=quantization,
                                    max_num_seqs=max(args.metrics_concurrency, 1),
                                    max_num_batched_tokens=args.max_num_batched_tokens,
                                    max_model_len=args.input_len + max(args.output_len, args.truth_output_len,
                                                                       args.hf_output_len)))
    run_engine(engine, prompts[:4], 8, "warmup")
    out["kv_capacity_tokens"] = engine.num_kv_blocks * engine.config.block_size  # sized as the server's (same flags)
    out["experts_precision"] = engine.moe_stats().precision
    out["weight_gib"] = sum(p.numel() * p.element_size() for p in engine.model.parameters()) / 2**30
    print(f"  {out['experts_precision']} experts, weights {out['weight_gib']:.1f} GiB, KV cache "
          f"{out['kv_capacity_tokens']} tokens", flush=True)
    if not args.skip_offline:
        out["offline_batch1"] = run_engine(engine, prompts[:1], args.output_len, "offline-b1")
        print(f"  offline engine, batch 1: decode step {out['offline_batch1']['decode_step_ms']:.2f} ms", flush=True)
    if not args.skip_truth:
        truth = measure_utilization(engine, prompts[: args.metrics_concurrency], args.truth_output_len)
        out["utilization_truth"] = truth
        print("  " + "\n  ".join(markdown_lines(truth)), flush=True)
    if not args.skip_hf and quantization == "none":  # HF would need its own FP8 copy of the weights
        engine.runner.graphs.clear()  # HF needs the memory of our KV cache and graphs (as bench_engine does)
        engine.runner.kv_cache = None
        gc.collect()
        if engine.device.type == "cuda":
            torch.cuda.empty_cache()
        hf = hf_sharing_weights(engine, preset)
        run_hf(hf, prompts[:1], 4, engine.device)  # warm-up
        out["hf"] = {}
        for b in args.hf_batches:
            try:
                out["hf"][b] = run_hf(hf, prompts[:b], args.hf_output_len, engine.device)
            except torch.OutOfMemoryError as err:
                out["hf"][b] = {"error": f"out of memory: {str(err)[:200]}"}
                torch.cuda.empty_cache()
            print(f"  HF generate batch {b}: {out['hf'][b].get('tok_s', float('nan')):.1f} tok/s", flush=True)
        del hf
    del engine
    gc.collect()
    if torch.device(args.device).type == "cuda":
        torch.cuda.empty_cache()
    return out


# ---- targets and report ----------------------------------------------------------------------------------------
def level(levels: list[dict], c: int) -> dict | None:
    return next((s for s in levels if s["max_concurrency"] == c), None)


def targets(r: dict, args) -> list[dict]:
    rows, mc = [], args.metrics_concurrency
    on = level(r["serve"]["levels"], mc) if "serve" in r else None
    hf = r.get("offline", {}).get("hf", {}).get(mc, {})
    if on and hf.get("tok_s") and on.get("request_rate") is None:  # open loop: tok/s is the offered rate
        ratio = on["output_throughput"] / hf["tok_s"]
        rows.append(dict(target=f"output tok/s at c={mc} ≥ {TARGETS['speedup']:.0f}× HF batch {mc}",
                         measured=f"{on['output_throughput']:.0f} vs {hf['tok_s']:.0f} = {ratio:.1f}×",
                         passed=ratio >= TARGETS["speedup"]))
    runs = [*r.get("serve", {}).get("levels", []),
            *(lv for run in r.get("overhead", {}).get("runs", []) for lv in run["levels"])]
    if runs:
        failed = sum(s["failed"] for s in runs)
        rows.append(dict(target="zero failed requests", measured=f"{failed} of {sum(s['num_requests_sent'] for s in runs)}",
                         passed=failed == 0))
    one, offline = level(r.get("serve", {}).get("levels", []), 1), r.get("offline", {}).get("offline_batch1")
    if one and offline and offline.get("decode_step_ms") and one["tpot_ms"]["p50"]:
        ratio = one["tpot_ms"]["p50"] / offline["decode_step_ms"]
        rows.append(dict(target=f"TPOT at c=1 ≤ {TARGETS['tpot_ratio']}× offline decode step (medians)",
                         measured=f"{one['tpot_ms']['p50']:.2f} ms vs {offline['decode_step_ms']:.2f} ms = "
                                  f"{ratio:.2f}× (mean TPOT {one['tpot_ms']['mean']:.2f} ms)",
                         passed=ratio <= TARGETS["tpot_ratio"]))
    oh = r.get("overhead")
    if oh:
        rows.append(dict(target=f"metrics overhead at c={mc} ≤ {TARGETS['metrics_overhead']:.0%}",
                         measured=f"mean {oh['on_tok_s']:.0f} on vs {oh['off_tok_s']:.0f} off tok/s over "
                                  f"{len(oh['runs'])} fresh servers ({', '.join(oh['order'])}) = {oh['overhead']:+.1%}",
                         passed=oh["overhead"] <= TARGETS["metrics_overhead"]))
    truth = r.get("offline", {}).get("utilization_truth", {})
    if "ratio_gauge_to_independent" in truth:
        rows.append(dict(target=f"utilization gauge within ±{TARGETS['truth_tolerance']:.0%} of the kernel "
                                f"benchmark (T={truth['batch']})",
                         measured=f"{truth['gauge']['utilization']:.4f} vs "
                                  f"{truth['reference_utilization']:.4f} = "
                                  f"{truth['ratio_gauge_to_independent']:.2f}×", passed=truth["within_tolerance"]))
    return rows


def markdown(report: dict, args) -> str:
    env, preset, r = report["env"], report["preset"], report["result"]
    quantization = report.get("quantization", "none")
    precision = "" if quantization == "none" else f" ({quantization}, quantised at load)"
    lines = [f"# Serving benchmark — {preset}{precision}, {env['device']}", "",
             f"{env['date']}, commit `{env['commit']}`, torch {env['torch']}, transformers {env['transformers']}; "
             f"random weights, input {args.input_len} / output {args.output_len} tokens (token-exact prompts, "
             f"ignore_eos, greedy), streamed /v1/completions over loopback HTTP; per level "
             f"max({args.prompts_per_concurrency:g}·c, {args.min_prompts}) requests, none started after "
             f"{args.level_time_limit_s:g} s.", ""]
    if "error" in r:
        lines += [f"**run failed:** {r['error']}", ""]
    if "serve" in r:
        lines += ["## Server (metrics on)", "", table(r["serve"]["levels"]), ""]
        lines += ["| concurrency | util gauge (median of scrapes) | timed MoE step ms | preemptions | max KV usage | "
                  "tokens counted by server / client |", "|---|---|---|---|---|---|"]
        for s in r["serve"]["levels"]:
            m = s["server_metrics"]
            gauge, kernel = m.get("tensor_core_utilization_median"), m.get("moe_kernel_seconds_mean")
            lines.append(f"| {s['max_concurrency']} | {'—' if gauge is None else f'{gauge:.4f}'} | "
                         f"{'—' if kernel is None else f'{kernel * 1e3:.2f}'} | {m.get('preemptions', float('nan')):g} | "
                         f"{m.get('kv_cache_usage_max', 0):.2f} | {m.get('generation_tokens', 0):.0f} / "
                         f"{s['total_output_tokens']} |")
        lines.append("")
    if "overhead" in r:
        oh = r["overhead"]
        lines += ["## Metrics overhead: fresh servers, metrics on / --no-expert-metrics in ABBA order, each warmed "
                  "by an untimed level at the same concurrency", "",
                  "| run | metrics | out tok/s | failed |", "|---|---|---|---|"]
        for i, run in enumerate(oh["runs"]):
            lv = run["levels"][0]
            lines.append(f"| {i + 1} | {'on' if run['metrics'] else 'off'} | {lv['output_throughput']:.1f} | "
                         f"{lv['failed']} |")
        pairs = oh.get("pair_overheads", [])
        lines += ["", f"Mean on {oh['on_tok_s']:.1f}, off {oh['off_tok_s']:.1f} tok/s: overhead {oh['overhead']:+.1%}; "
                      f"per pair of servers {', '.join(f'{p:+.1%}' for p in pairs)}"
                      f"{f' (median {statistics.median(pairs):+.1%})' if pairs else ''}.", ""]
    off = r.get("offline", {})
    if "kv_capacity_tokens" in off:
        lines += [f"Experts in {off['experts_precision']}, weights {off['weight_gib']:.1f} GiB, KV cache "
                  f"{off['kv_capacity_tokens']} tokens (the offline engine, sized by the server's flags).", ""]
    if off.get("hf"):
        lines += ["## Baseline: HF transformers, offline", "", BASELINE_NOTE, "",
                  "| batch | output tokens | seconds | tok/s | ours at c=batch, out tok/s |", "|---|---|---|---|---|"]
        for b, h in off["hf"].items():
            ours = level(r.get("serve", {}).get("levels", []), b)
            ours_text = f"{ours['output_throughput']:.1f}" if ours else "—"
            lines.append(f"| {b} | {h.get('output_tokens', '—')} | {h.get('seconds', float('nan')):.1f} | "
                         f"{h.get('tok_s', float('nan')):.1f} | {ours_text} |")
        lines.append("")
    if "utilization_truth" in off:
        lines += ["## Utilization metric truth", "", *markdown_lines(off["utilization_truth"]), ""]
    rows = targets(r, args)
    if rows:
        lines += ["## Targets", "", "| target | measured | met |", "|---|---|---|"]
        lines += [f"| {t['target']} | {t['measured']} | {'yes' if t['passed'] else 'NO'} |" for t in rows]
        lines.append("")
    return "\n".join(lines)


def bench_preset(preset, args, out: Path, quantization: str = "none") -> dict:
    levels = sorted(set(args.concurrency))
    count = max(prompts_needed(args, levels, max(levels)),
                prompts_needed(args, [args.metrics_concurrency], args.metrics_concurrency))  # one server's
    prompts = make_prompts(max(count, *args.hf_batches), args.input_len, PRESETS[preset]["vocab_size"])
    specs = token_prompts(prompts, args.output_len)
    r, phases = {}, {}
    try:
        t = time.perf_counter()
        # warmed at the largest level: 8 warm-up requests left first-use compiles of c=64's prefill and mixed steps
        # inside the timed level on a fresh machine (gpu_runs.md, 2026-12-07 05:42: ~4 s of a 17.6 s level)
        # --request-rate applies here only: the metrics ABBA below compares closed loops (an open loop's
        # throughput is the offered rate, whatever the metrics cost)
        r["serve"] = serve_phase(preset, args, specs, levels, True, out / "logs", warm_concurrency=max(levels),
                                 quantization=quantization, request_rate=args.request_rate)
        phases["serve_s"] = time.perf_counter() - t
        if not args.skip_metrics_off and quantization == "none":
            t = time.perf_counter()
            r["overhead"] = overhead_phase(preset, args, specs, out / "logs")
            phases["overhead_s"] = time.perf_counter() - t
        t = time.perf_counter()
        r["offline"] = offline_phase(preset, args, prompts, quantization)
        phases["offline_s"] = time.perf_counter() - t
    except Exception as err:  # noqa: BLE001 - keep what was measured, say what broke
        r["error"] = f"{type(err).__name__}: {err}"
        print(f"  FAILED: {r['error']}", flush=True)
    r["phase_seconds"] = phases
    r["targets"] = targets(r, args)
    return r


def write_report(report: dict, args, stem: Path) -> list[Path]:
    """JSON, markdown and (when matplotlib is there) the two PNGs of one preset."""
    result, env = report["result"], report["env"]
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str))
    text = markdown(report, args)
    stem.with_suffix(".md").write_text(text)
    print(text)
    written = [stem.with_suffix(".json"), stem.with_suffix(".md")]
    if result.get("serve") and len(result["serve"]["levels"]) > 1:
        hf = {b: h["tok_s"] for b, h in result.get("offline", {}).get("hf", {}).items() if "tok_s" in h}
        try:
            written += plot_sweep(result["serve"]["levels"], stem, f"{report['preset']} ({env['device']})", hf,
                                  "HF transformers generate, output tok/s (offline, no HTTP)")
        except ImportError as err:
            print(f"no plots ({err}): redraw them elsewhere with --replot {stem.with_suffix('.json')}", flush=True)
    return written


def replot(path: Path) -> int:
    """Markdown and PNGs again from a report JSON (e.g. on a machine with matplotlib)."""
    report = json.loads(path.read_text())
    hf = report["result"].get("offline", {}).get("hf")
    if hf:  # JSON object keys are strings; batch sizes are ints everywhere else
        report["result"]["offline"]["hf"] = {int(b): h for b, h in hf.items()}
    args = argparse.Namespace(**report["args"])
    report["result"]["targets"] = targets(report["result"], args)
    written = write_report(report, args, path.with_suffix(""))
    print("wrote " + ", ".join(str(p) for p in written), flush=True)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.replot:
        return replot(Path(args.replot))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ok, results = True, {}
    for preset in args.presets:
        for quantization in args.quantization:
            name = preset if quantization == "none" else f"{preset}_{quantization}"
            print(f"== {name}", flush=True)
            result = results[name] = bench_preset(preset, args, out, quantization)
            env = environment(args.device)  # after the servers ran: a CUDA context here would shrink their KV cache
            report = dict(env=env, preset=preset, quantization=quantization, args=vars(args),
                          baseline_note=BASELINE_NOTE, result=result)
            rate = "" if args.request_rate == float("inf") else f"_rate{args.request_rate:g}"
            written = write_report(report, args, out / f"bench_serve_{env['date'][:10]}_{name}{rate}")
            print("wrote " + ", ".join(str(p) for p in written), flush=True)
            ok = ok and "error" not in result and all(t["passed"] for t in result["targets"])
    for line in precision_lines(results, args.metrics_concurrency):
        print(line, flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

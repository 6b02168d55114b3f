#!/usr/bin/env python
"""Prefix-caching benchmark (issue 22): the server with automatic prefix caching on and with --no-prefix-caching, in
one session, on two workloads:
1. multi-turn (service/loadgen/multiturn.py): --conversations conversations of --turns turns, all starting with the
   same --system-prompt-len tokens; each turn re-sends the conversation so far plus --user-len new tokens and
   generates --turn-output-len tokens. Target: TTFT p50 over turns >= 2 at least 3x lower with caching.
2. no reuse: random --input-len-token prompts, --output-len tokens each, at --concurrency. Target: output tok/s with
   caching at least 98% of the output tok/s without.
Servers are fresh and alternate in ABBA order (on, off, off, on for --repeats 2; bench_serve.py's Server, metrics
on). Each is first warmed by an untimed level of the no-reuse shape on prompts used nowhere else, then runs the
no-reuse level, then the conversations; /metrics is scraped during both, so the report has the hit rate the server
itself counted. Latencies of one setting are pooled over its servers; throughputs are averaged.

    python benchmarks/bench_prefix_cache.py --presets olmoe-1b-7b --out DIR
    python benchmarks/bench_prefix_cache.py --presets tiny --device cpu --quick --out DIR     (CPU smoke run)
"""

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.bench_engine import environment, make_prompts
from benchmarks.bench_serve import Server
from model.presets import PRESETS
from service.arg_types import non_negative_float, positive_int
from service.loadgen.client import run_level
from service.loadgen.dataset import PromptSpec, token_prompts
from service.loadgen.multiturn import make_conversations, max_prompt_len, run_conversations, summarize_turns, \
    turns_table
from service.loadgen.processes import default_client_processes
from service.loadgen.report import distribution_ms, summarize, table
from service.loadgen.scrape import MetricsScraper

ROOT = Path(__file__).resolve().parents[1]
TARGETS = dict(ttft_speedup=3.0, throughput_ratio=0.98)
QUICK = dict(conversations=4, turns=3, system_prompt_len=64, user_len=16, turn_output_len=8, input_len=32,
             output_len=16, concurrency=4, prompts_per_level=8, repeats=1)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["olmoe-1b-7b", "qwen3-30b-a3b"], choices=list(PRESETS))
    p.add_argument("--conversations", type=int, default=64)
    p.add_argument("--turns", type=int, default=8)
    p.add_argument("--system-prompt-len", type=int, default=2048)
    p.add_argument("--user-len", type=int, default=128, help="new user tokens per turn")
    p.add_argument("--turn-output-len", type=int, default=128, help="tokens generated per turn")
    p.add_argument("--input-len", type=int, default=512, help="no-reuse prompts")
    p.add_argument("--output-len", type=int, default=256, help="no-reuse outputs")
    p.add_argument("--concurrency", type=int, default=64, help="no-reuse level")
    p.add_argument("--prompts-per-level", type=int, default=256, help="no-reuse requests (and warm-up requests)")
    p.add_argument("--level-time-limit-s", type=float, default=60.0, help="no new no-reuse request after this")
    p.add_argument("--repeats", type=int, default=2, help="server pairs, ABBA order")
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--scrape-interval-s", type=float, default=2.0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--server-arg", action="append", default=[], help="extra `serve` flag (repeatable)")
    p.add_argument("--startup-timeout-s", type=float, default=900.0)
    p.add_argument("--client-processes", type=positive_int, default=default_client_processes(),
                   help="load-generator processes the requests are split over (service/loadgen/processes.py)")
    p.add_argument("--start-spread-s", type=non_negative_float, default=0.0,
                   help="conversations start at seeded uniform random times in [0, S); 0: all at once, in step")
    p.add_argument("--turn-interval-s", type=non_negative_float, default=0.0,
                   help="turn t of a conversation is sent t * S after its start (or later, if turn t - 1 is not "
                        "complete): both servers see the same arrivals; 0: each turn once the previous one is done")
    p.add_argument("--quick", action="store_true", help="a small shape of everything, one pair (CPU smoke run)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    if args.quick:
        for name, value in QUICK.items():
            setattr(args, name, value)
    return args


def server_config(args, conversations, caching: bool) -> argparse.Namespace:
    """What bench_serve.Server reads; flags in server_arg come last on its command line, so they win."""
    max_len = max(max_prompt_len(conversations) + args.turn_output_len, args.input_len + args.output_len)
    seqs = max(args.concurrency, args.conversations)
    flags = ["--max-model-len", str(max_len), *([] if caching else ["--no-prefix-caching"]), *args.server_arg]
    return argparse.Namespace(concurrency=[seqs], metrics_concurrency=seqs, input_len=args.input_len,
                              output_len=args.output_len, max_num_batched_tokens=args.max_num_batched_tokens,
                              device=args.device, server_arg=flags, startup_timeout_s=args.startup_timeout_s)


async def measure(server: Server, preset: str, args, warm: list[PromptSpec], specs: list[PromptSpec],
                  conversations) -> dict:
    await run_level(server.base_url, warm, model=preset, max_concurrency=args.concurrency,
                    processes=args.client_processes)  # also starts the client processes, untimed
    async with MetricsScraper(server.base_url, args.scrape_interval_s) as scraper:
        run = await run_level(server.base_url, specs, model=preset, max_concurrency=args.concurrency,
                              time_limit_s=args.level_time_limit_s, processes=args.client_processes)
    no_reuse = summarize(run)
    no_reuse["server_metrics"] = scraper.summary()
    async with MetricsScraper(server.base_url, args.scrape_interval_s) as scraper:
        conv_run = await run_conversations(server.base_url, conversations, model=preset,
                                           start_spread_s=args.start_spread_s, processes=args.client_processes,
                                           turn_interval_s=args.turn_interval_s)
    multi = summarize_turns(conv_run)
    multi["server_metrics"] = scraper.summary()
    multi["ttft_s_turn2plus"] = [r.ttft_s for t, r in conv_run.results if t >= 1 and r.ok]  # pooled later
    return dict(no_reuse=no_reuse, multi_turn=multi)


def run_server(preset, args, caching: bool, index: int, inputs, log_dir: Path) -> dict:
    warm, specs, conversations = inputs
    server = Server(preset, server_config(args, conversations, caching),
                    log_dir / f"server_{preset}_prefix_{'on' if caching else 'off'}{index}.log", metrics=True)
    try:
        startup = server.wait_healthy(args.startup_timeout_s)
        result = asyncio.run(measure(server, preset, args, warm, specs, conversations))
    finally:
        server.stop()
    nr, mt = result["no_reuse"], result["multi_turn"]
    print(f"  server {index + 1} (caching {'on' if caching else 'off'}, up in {startup:.0f} s): no reuse "
          f"{nr['output_throughput']:.1f} out tok/s; multi-turn TTFT p50 turn 1 "
          f"{mt['turns'][0]['ttft_ms']['p50'] or 0:.0f} ms, turns >= 2 {mt['ttft_ms_turn2plus']['p50'] or 0:.0f} ms, "
          f"server-side TTFT mean {1e3 * (mt['server_metrics'].get('server_ttft_mean_s') or 0):.0f} ms, "
          f"hit rate {hit_rate(mt['server_metrics']):.1%}; failed {nr['failed'] + mt['failed']}", flush=True)
    return dict(caching=caching, command=" ".join(server.command[1:]), startup_s=startup, **result)


def late_turns(result: dict) -> str:
    return ", ".join(str(run["multi_turn"].get("late_turns", 0)) for run in result["runs"]) or "none"


def hit_rate(metrics: dict) -> float:
    queries = metrics.get("prefix_cache_queries") or 0
    return metrics.get("prefix_cache_hits", 0) / queries if queries else 0.0


def bench_preset(preset, args, out: Path) -> dict:
    vocab = PRESETS[preset]["vocab_size"]
    n = args.prompts_per_level
    prompts = make_prompts(2 * n, args.input_len, vocab, seed=1)
    warm = [PromptSpec(p, len(p), 16) for p in prompts[n:]]  # the same shapes, prompts never used again
    inputs = (warm, token_prompts(prompts[:n], args.output_len),
              make_conversations(args.conversations, args.turns, args.system_prompt_len, args.user_len,
                                 args.turn_output_len, vocab, seed=2))
    order = [c for _ in range(args.repeats) for c in (True, False, False, True)][: 2 * args.repeats]
    result = {"order": ["on" if c else "off" for c in order], "runs": []}
    try:
        for i, caching in enumerate(order):
            result["runs"].append(run_server(preset, args, caching, i, inputs, out / "logs"))
    except Exception as err:  # noqa: BLE001 - keep what was measured, say what broke
        result["error"] = f"{type(err).__name__}: {err}"
        print(f"  FAILED: {result['error']}", flush=True)
    result["compare"] = compare(result["runs"])
    result["targets"] = targets(result["compare"], result["runs"])
    return result


def compare(runs: list[dict]) -> dict:
    out = {}
    for name, caching in (("on", True), ("off", False)):
        mine = [r for r in runs if r["caching"] == caching]
        if not mine:
            continue
        ttfts = [t for r in mine for t in r["multi_turn"]["ttft_s_turn2plus"]]
        out[name] = dict(servers=len(mine), ttft_ms_turn2plus=distribution_ms(ttfts),
                         ttft_ms_turn1_p50=statistics.median(r["multi_turn"]["turns"][0]["ttft_ms"]["p50"] or 0
                                                             for r in mine),
                         no_reuse_tok_s=statistics.fmean(r["no_reuse"]["output_throughput"] for r in mine),
                         multi_turn_tok_s=statistics.fmean(r["multi_turn"]["output_throughput"] for r in mine),
                         hit_rate=statistics.fmean(hit_rate(r["multi_turn"]["server_metrics"]) for r in mine),
                         server_ttft_ms_mean=1e3 * statistics.fmean(
                             r["multi_turn"]["server_metrics"].get("server_ttft_mean_s") or 0 for r in mine))
    return out


def targets(cmp: dict, runs: list[dict]) -> list[dict]:
    rows = []
    if "on" in cmp and "off" in cmp and cmp["on"]["ttft_ms_turn2plus"]["p50"]:
        on, off = cmp["on"]["ttft_ms_turn2plus"]["p50"], cmp["off"]["ttft_ms_turn2plus"]["p50"]
        rows.append(dict(target=f"multi-turn TTFT p50 over turns >= 2 at least {TARGETS['ttft_speedup']:g}x lower "
                                f"with caching", measured=f"{on:.0f} ms on vs {off:.0f} ms off = {off / on:.1f}x",
                         passed=off / on >= TARGETS["ttft_speedup"]))
        ratio = cmp["on"]["no_reuse_tok_s"] / cmp["off"]["no_reuse_tok_s"]
        rows.append(dict(target=f"no-reuse output tok/s with caching >= {TARGETS['throughput_ratio']:.0%} of without",
                         measured=f"{cmp['on']['no_reuse_tok_s']:.0f} vs {cmp['off']['no_reuse_tok_s']:.0f} tok/s "
                                  f"= {ratio:.1%}", passed=ratio >= TARGETS["throughput_ratio"]))
    if runs:
        levels = [lv for r in runs for lv in (r["no_reuse"], r["multi_turn"])]
        failed = sum(lv["failed"] for lv in levels)
        rows.append(dict(target="zero failed requests", measured=f"{failed} of {sum(lv['num_requests_sent'] for lv in levels)}",
                         passed=failed == 0))
    return rows


def markdown(report: dict) -> str:
    env, a, r = report["env"], report["args"], report["result"]
    lines = [f"# Prefix-caching benchmark — {report['preset']}, {env['device']}", "",
             f"{env['date']}, commit `{env['commit']}`, torch {env['torch']}; random weights. Multi-turn: "
             f"{a['conversations']} conversations × {a['turns']} turns, shared system prompt {a['system_prompt_len']} "
             f"tokens, {a['user_len']} new user tokens and {a['turn_output_len']} output tokens per turn, "
             + ("all conversations at once" if not a.get("start_spread_s") else
                f"conversations starting at random times within {a['start_spread_s']:g} s")
             + (f", turn t sent at t × {a['turn_interval_s']:g} s (the same arrivals for both settings; "
                f"late turns per server: {late_turns(r)})" if a.get("turn_interval_s") else
                ", each turn sent once the previous answer is complete")
             + f". No reuse: random {a['input_len']}-token prompts, {a['output_len']} output tokens, "
             f"concurrency {a['concurrency']}, {a['prompts_per_level']} requests. Fresh servers in the order "
             f"{', '.join(r['order'])}.", ""]
    if "error" in r:
        lines += [f"**run failed:** {r['error']}", ""]
    if r["compare"]:
        lines += ["| caching | servers | TTFT p50 turn 1 ms | TTFT ms turns ≥ 2 mean/p50/p99 | hit rate (server) | "
                  "server TTFT mean ms (all turns) | multi-turn out tok/s | no-reuse out tok/s |", "|---|---|---|---|---|---|---|---|"]
        for name, c in r["compare"].items():
            d = c["ttft_ms_turn2plus"]
            lines.append(f"| {name} | {c['servers']} | {c['ttft_ms_turn1_p50']:.0f} | "
                         + "/".join("—" if d[k] is None else f"{d[k]:.0f}" for k in ("mean", "p50", "p99"))
                         + f" | {c['hit_rate']:.1%} | {c.get('server_ttft_ms_mean', 0):.0f} | {c['multi_turn_tok_s']:.1f} | "
                           f"{c['no_reuse_tok_s']:.1f} |")
        lines.append("")
    for i, run in enumerate(r["runs"]):
        lines += [f"## Server {i + 1}: caching {'on' if run['caching'] else 'off'}", "", "No reuse:", "",
                  table([run["no_reuse"]]), "", "Multi-turn:", "", turns_table(run["multi_turn"]), ""]
    if r["targets"]:
        lines += ["## Targets", "", "| target | measured | met |", "|---|---|---|"]
        lines += [f"| {t['target']} | {t['measured']} | {'yes' if t['passed'] else 'NO'} |" for t in r["targets"]]
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ok = True
    for preset in args.presets:
        print(f"== {preset}", flush=True)
        started = time.perf_counter()
        result = bench_preset(preset, args, out)
        result["seconds"] = time.perf_counter() - started
        env = environment(args.device)  # after the servers ran: a CUDA context here would shrink their KV cache
        report = dict(env=env, preset=preset, args=vars(args), result=result)
        stem = out / f"bench_prefix_cache_{env['date'][:10]}_{preset}"
        stem.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str))
        text = markdown(report)
        stem.with_suffix(".md").write_text(text)
        print(text)
        print(f"wrote {stem}.json, {stem}.md", flush=True)
        ok = ok and "error" not in result and all(t["passed"] for t in result["targets"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

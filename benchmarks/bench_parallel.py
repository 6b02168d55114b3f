"""Parallel benchmarks: engine throughput at 1, 2, 4, 8 GPUs, and the MoE combine collectives.

`engine` (default): offline LLMEngine throughput of a random-weight preset (default qwen3-30b-a3b) at each world
size, each in a fresh process (so NCCL state and GPU memory never leak between sizes): all prompts submitted at
once, `--output-len` greedy tokens, EOS ignored; output tokens/s and the median decode step time (the steps in
which every request decodes, as bench_engine.py measures them). For each world size > 1 both MoE splits run:
`ep` (expert parallel: whole experts, contiguous ranges per rank) and `tp` (every expert's columns split). The
1-GPU run is the plain engine (the baseline); `--large` adds Qwen3-235B-A22B (random weights, its real config),
which needs 8 H200s. Writes bench_parallel_<date>.json and .md to --out.

`collectives`: per MoE layer, the communication of the two designs at the same token counts, over NCCL on GPUs
or gloo on the CPU: all-reduce of [T, H] (ours: tokens replicated after attention's all-reduce), reduce-scatter +
all-gather (the same volume, for sequence-parallel attention), and all-to-all dispatch + combine of T·k/W rows per
rank (data-parallel attention, balanced routing).

    python benchmarks/bench_parallel.py [engine] [--gpus 1 2 4 8] [--preset qwen3-30b-a3b] [--large] [--quick]
    python benchmarks/bench_parallel.py collectives [--gpus 2 4 8] [--tokens 8 64 512 4096] [--hidden 2048]
"""

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # NVLink multicast stays off (shared machines)
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")

from benchmarks.bench_engine import environment, make_prompts, run_engine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

QWEN3_235B = dict(  # Qwen/Qwen3-235B-A22B config.json (the fields we read)
    model_type="qwen3_moe", vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=94,
    num_attention_heads=64, num_key_value_heads=4, head_dim=128, max_position_embeddings=40960,
    moe_intermediate_size=1536, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1,
    mlp_only_layers=[], rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=False, attention_bias=False,
    bos_token_id=151643, eos_token_id=151645, torch_dtype="bfloat16")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", nargs="?", default="engine", choices=["engine", "collectives", "_engine_run",
                                                                 "_collectives_rank"])
    p.add_argument("--gpus", nargs="+", type=int, default=None, help="world sizes (default: 1 2 4 8 that fit)")
    p.add_argument("--preset", default="qwen3-30b-a3b")
    p.add_argument("--large", action="store_true", help="also Qwen3-235B-A22B at the largest world size")
    p.add_argument("--splits", nargs="+", default=["ep", "tp"], choices=["ep", "tp"])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--time-budget", type=float, default=540.0, help="seconds for the whole command")
    p.add_argument("--quick", action="store_true", help="batch 64, 64 output tokens, the ep split only")
    p.add_argument("--tokens", nargs="+", type=int, default=[8, 64, 512, 4096], help="collectives: T")
    p.add_argument("--hidden", type=int, default=2048, help="collectives: H")
    p.add_argument("--top-k", type=int, default=8, help="collectives: k")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    # internal (child processes)
    p.add_argument("--world", type=int, default=1)
    p.add_argument("--split", default="ep")
    p.add_argument("--model", default=None)
    p.add_argument("--deadline", type=float, default=None)
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--port", type=int, default=0)
    args = p.parse_args()
    if args.quick:
        args.batch, args.output_len, args.splits = min(args.batch, 64), min(args.output_len, 64), ["ep"]
    return args


def world_sizes(args, minimum: int = 1) -> list[int]:
    if args.gpus:
        return args.gpus
    available = torch.cuda.device_count() if args.device == "cuda" else 2
    return [w for w in (1, 2, 4, 8) if minimum <= w <= available]


# ---- engine -------------------------------------------------------------------------------------------------------
def engine_run(args) -> dict:
    """One world size in this process (rank 0; the engine spawns the other ranks). Prints one JSON line."""
    from model.engine import EngineConfig, LLMEngine
    from model.parallel import ParallelConfig
    from model.parallel.launcher import parallel_engine

    config = EngineConfig(model=args.model, random_weights=True, device=args.device, max_num_seqs=args.batch,
                          max_num_batched_tokens=args.max_num_batched_tokens, gpu_memory_utilization=0.9,
                          num_kv_blocks=None if args.device == "cuda" else 256)
    started = time.perf_counter()
    if args.world > 1:
        engine = parallel_engine(config, ParallelConfig(args.world, args.world if args.split == "ep" else 1))
    else:
        engine = LLMEngine(config)
    startup = time.perf_counter() - started
    try:
        vocab = engine.model_config.vocab_size
        run_engine(engine, make_prompts(min(8, args.batch), 32, vocab, seed=1), 8, "warm")
        deadline = None if args.deadline is None else time.perf_counter() + args.deadline - time.time()
        result = run_engine(engine, make_prompts(args.batch, args.input_len, vocab), args.output_len, "bench",
                            deadline=deadline)
    finally:
        engine.shutdown()
    result.update(world=args.world, split=args.split if args.world > 1 else "—", startup_s=startup,
                  kv_blocks=engine.num_kv_blocks, graphs=engine.runner.num_graphs)
    return result


def run_child(args, world: int, split: str, model: str, budget: float) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "_engine_run", "--world", str(world), "--split", split,
               "--model", model, "--device", args.device, "--batch", str(args.batch), "--input-len",
               str(args.input_len), "--output-len", str(args.output_len), "--max-num-batched-tokens",
               str(args.max_num_batched_tokens), "--deadline", str(time.time() + 0.8 * budget)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=budget)
    except subprocess.TimeoutExpired:
        return dict(world=world, split=split, model=model, error=f"timed out after {budget:.0f} s")
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        return dict(world=world, split=split, model=model, error=(done.stderr or done.stdout)[-1500:])
    return dict(json.loads(lines[-1]), model=model)


def bench_engine_sizes(args) -> dict:
    deadline = time.time() + args.time_budget
    runs = [(1, "ep", args.preset)] if 1 in world_sizes(args) else []
    runs += [(w, split, args.preset) for w in world_sizes(args) if w > 1 for split in args.splits]
    large_dir = None
    if args.large:
        large_dir = Path(tempfile.mkdtemp(prefix="qwen3-235b-a22b-"))
        (large_dir / "config.json").write_text(json.dumps(QWEN3_235B))
        runs.append((max(world_sizes(args)), "ep", str(large_dir)))
    results = []
    for i, (world, split, model) in enumerate(runs):
        share = (deadline - time.time()) / (len(runs) - i)
        if share < 60:
            results.append(dict(world=world, split=split, model=model, error="no time left"))
            continue
        result = run_child(args, world, split, model, share)
        result["model"] = "qwen3-235b-a22b" if model == str(large_dir) else model
        results.append(result)
        print(summary_line(result), flush=True)
    return dict(environment(args.device), kind="engine", batch=args.batch, input_len=args.input_len,
                output_len=args.output_len, runs=results)


def summary_line(r: dict) -> str:
    if "error" in r:
        return f"{r['model']} x{r['world']} {r['split']}: ERROR {r['error'][-300:]}"
    return (f"{r['model']} x{r['world']} {r['split']}: {r['tok_s']:.0f} output tok/s, decode step "
            f"{r['decode_step_ms'] or float('nan'):.1f} ms, start-up {r['startup_s']:.0f} s"
            f"{' (truncated)' if r.get('truncated') else ''}")


# ---- collectives --------------------------------------------------------------------------------------------------
def collectives_rank(args) -> None:
    """One rank of the collectives benchmark (started by `collectives`)."""
    import torch.distributed as dist

    from model.parallel.comm import init_process_groups

    world, rank = args.world, args.rank
    device = torch.device("cuda", rank) if args.device == "cuda" else torch.device("cpu")
    store = dist.TCPStore("127.0.0.1", args.port, world, is_master=rank == 0, wait_for_workers=False)
    groups = init_process_groups(rank, world, device, store, collective_timeout_s=120)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    H, k = args.hidden, args.top_k
    rows = {}

    def timed(fn, iters):
        for _ in range(3):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dist.barrier(group=groups.control)
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return 1e6 * (time.perf_counter() - start) / iters  # µs

    for T in args.tokens:
        T = max(world, T - T % world)
        full = torch.randn(T, H, device=device, dtype=dtype)
        part = torch.empty(T // world, H, device=device, dtype=dtype)
        dispatched = torch.randn(T // world * k, H, device=device, dtype=dtype)  # [T/W * k, H] per rank
        received = torch.empty_like(dispatched)
        iters = 20 if device.type == "cuda" else 5

        def a2a():
            dist.all_to_all_single(received, dispatched)  # dispatch
            dist.all_to_all_single(dispatched, received)  # combine

        def rs_ag():
            dist.reduce_scatter_tensor(part, full)
            dist.all_gather_into_tensor(full, part)

        rows[T] = dict(all_reduce_us=timed(lambda: dist.all_reduce(full), iters), reduce_scatter_all_gather_us=timed(
            rs_ag, iters), all_to_all_us=timed(a2a, iters))
    if rank == 0:
        print(json.dumps(dict(world=world, backend=dist.get_backend(), hidden=H, top_k=k, dtype=str(dtype),
                              tokens=rows)), flush=True)
    groups.destroy()


def bench_collectives(args) -> dict:
    import socket

    results = []
    for world in world_sizes(args, minimum=2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        base = [sys.executable, str(Path(__file__).resolve()), "_collectives_rank", "--world", str(world), "--port",
                str(port), "--device", args.device, "--hidden", str(args.hidden), "--top-k", str(args.top_k),
                "--tokens", *map(str, args.tokens)]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        procs = [subprocess.Popen(base + ["--rank", str(r)], stdout=subprocess.PIPE, text=True, env=env)
                 for r in range(world)]
        out = procs[0].communicate(timeout=args.time_budget)[0]
        for p in procs[1:]:
            p.wait(timeout=60)
        line = [x for x in out.splitlines() if x.startswith("{")][-1]
        results.append(json.loads(line))
        for T, row in results[-1]["tokens"].items():
            print(f"W={world} T={T}: " + ", ".join(f"{k[:-3]} {v:.0f} µs" for k, v in row.items()), flush=True)
    return dict(environment(args.device), kind="collectives", runs=results)


# ---- report -------------------------------------------------------------------------------------------------------
def markdown(report: dict) -> str:
    head = (f"# bench_parallel {report['kind']}: {report['device']}, {report['date']}, "
            f"commit {report['commit'][:12]}\n")
    if report["kind"] == "collectives":
        lines = [head, "| world | backend | T | all-reduce µs | reduce-scatter + all-gather µs | all-to-all ×2 µs |",
                 "| --- | --- | --- | --- | --- | --- |"]
        for run in report["runs"]:
            for T, row in run["tokens"].items():
                lines.append(f"| {run['world']} | {run['backend']} | {T} | {row['all_reduce_us']:.0f} | "
                             f"{row['reduce_scatter_all_gather_us']:.0f} | {row['all_to_all_us']:.0f} |")
        return "\n".join(lines) + "\n"
    base = next((r["tok_s"] for r in report["runs"] if r.get("world") == 1 and "tok_s" in r), None)
    lines = [head, f"batch {report['batch']}, input {report['input_len']}, output {report['output_len']} tokens\n",
             "| model | GPUs | MoE split | output tok/s | vs 1 GPU | decode step ms | start-up s |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["runs"]:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['world']} | {r['split']} | error | | | |")
            continue
        ratio = f"{r['tok_s'] / base:.2f}×" if base and r["model"] == report["runs"][0]["model"] else "—"
        step = "—" if r["decode_step_ms"] is None else f"{r['decode_step_ms']:.1f}"
        lines.append(f"| {r['model']} | {r['world']} | {r['split']} | {r['tok_s']:.0f} | {ratio} | {step} | "
                     f"{r['startup_s']:.0f} |")
    return "\n".join(lines) + "\n"


def main():
    args = parse_args()
    if args.mode == "_engine_run":
        print(json.dumps(engine_run(args)), flush=True)
        return
    if args.mode == "_collectives_rank":
        collectives_rank(args)
        return
    report = bench_collectives(args) if args.mode == "collectives" else bench_engine_sizes(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"bench_parallel_{report['kind']}_{datetime.date.today().isoformat()}_{report['device'].replace(' ', '-')}"
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1))
    (out / f"{stem}.md").write_text(markdown(report))
    print(markdown(report))
    print(f"wrote {out / stem}.json and .md")


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Where the time of engine steps goes, for random-weight presets on the GPU (the engine sections of NOTES.md).

`step-phases`: host time of each phase of LLMEngine.step during decode, the GPU's idle gap between one step's last
kernel and the next step's first, the step's kernel table, and the same graph replayed alone.
`prefill`: prefill and mixed (prefill + decode) steps: wall clock, GPU time from the step's first to its last
kernel, the kernel table and a host profile (cProfile) of one step.

    python benchmarks/profile_engine.py step-phases [--sync] [--quantization fp8] [--no-expert-metrics] [preset ...]   (default: olmoe-1b-7b qwen3-30b-a3b)
    python benchmarks/profile_engine.py prefill [--budget N ...] [--quantization fp8] [preset ...]   (default: olmoe-1b-7b, 2048 8192)
"""

import argparse
import cProfile
import gc
import io
import pstats
import random
import statistics
import time
from collections import defaultdict

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from benchmarks.bench_timing import replay_ms
from model.engine import EngineConfig, LLMEngine, SamplingParams
from service.arg_types import positive_int


def timed(obj, name, table, record_event=None):
    original = getattr(obj, name)

    def wrapper(*args, **kwargs):
        if record_event is not None:
            record_event("start")
        t = time.perf_counter()
        result = original(*args, **kwargs)
        table[name].append(time.perf_counter() - t)
        return result
    setattr(obj, name, wrapper)


def kernel_times(prof) -> dict[str, float]:
    """Device µs per kernel name, summed over the profile."""
    times: dict[str, float] = defaultdict(float)
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            times[e.name[:70]] += e.device_time
    return times


def kernel_table(prof, steps: int):
    """Every kernel of the profiled engine steps: count and device µs per step, largest first."""
    times, counts = defaultdict(float), defaultdict(int)
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            times[e.name[:90]] += e.device_time / steps
            counts[e.name[:90]] += 1
    print(f"    kernels per engine step: {sum(counts.values()) / steps:.0f}, {sum(times.values()):.0f} µs busy", flush=True)
    for name in sorted(times, key=lambda n: -times[n]):
        print(f"      {counts[name] / steps:5.0f} x {times[name] / max(1, counts[name]) * steps:7.1f} µs = "
              f"{times[name]:7.1f} µs  {name}", flush=True)


def kernel_time_difference(engine_prof, alone_prof, top=12):
    """Which kernels take longer in 4 engine steps than in 4 replays of the same graph alone."""
    ours, alone = kernel_times(engine_prof), kernel_times(alone_prof)
    print(f"    kernel time, 4 engine steps {sum(ours.values()) / 1e3:.2f} ms, 4 replays alone "
          f"{sum(alone.values()) / 1e3:.2f} ms; largest differences (µs):", flush=True)
    for name in sorted(ours.keys() | alone.keys(), key=lambda n: -abs(ours.get(n, 0) - alone.get(n, 0)))[:top]:
        print(f"      {ours.get(name, 0):9.0f} {alone.get(name, 0):9.0f}  {name}", flush=True)


def step_phases(preset: str, batches=(1, 64), input_len=512, output_len=64, async_scheduling=True,
                quantization="none", expert_metrics=True):
    """Host time of each phase of LLMEngine.step and the GPU's idle gap between steps, per decode batch."""
    engine = LLMEngine(EngineConfig(model=preset, random_weights=True, max_num_seqs=max(batches),
                                    max_model_len=input_len + output_len, max_num_batched_tokens=8192,
                                    async_scheduling=async_scheduling, quantization=quantization,
                                    expert_metrics=expert_metrics))
    rng = random.Random(0)
    vocab = engine.model_config.vocab_size
    phases: dict[str, list[float]] = defaultdict(list)
    events: list[tuple[str, torch.cuda.Event]] = []

    def record(tag):
        if not torch.cuda.is_available():  # a CPU dry run checks the phases only
            return
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        events.append((tag, e))

    timed(engine.scheduler, "schedule", phases)
    timed(engine.runner, "execute", phases, record)
    timed(engine.runner, "_replay", phases)
    timed(engine.sampler, "sample", phases)
    timed(engine, "_emit_pending", phases)
    timed(engine, "_forward", phases)
    timed(engine, "_sample", phases)
    timed(engine, "_read_back", phases)
    timed(engine.moe, "end_step", phases)
    replay = torch.cuda.CUDAGraph.replay

    def timed_replay(graph):
        t = time.perf_counter()
        record("replay")
        replay(graph)
        record("replayed")
        phases["graph.replay"].append(time.perf_counter() - t)
    torch.cuda.CUDAGraph.replay = timed_replay
    try:
        for b in batches:
            params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
            for i in range(b):
                engine.add_request(f"{b}-{i}", [rng.randrange(vocab) for _ in range(input_len)], params)
            walls, rows = [], []
            seqs = list(engine.scheduler.waiting)
            prof = None
            while engine.has_unfinished_requests():
                if torch.cuda.is_available() and len(walls) in (30, 34):  # kernels of 4 engine steps
                    prof = prof or profile(activities=[ProfilerActivity.CUDA])
                    (prof.start if len(walls) == 30 else prof.stop)()
                for v in phases.values():
                    v.clear()
                events.clear()
                n_running = len(engine.scheduler.running)
                t = time.perf_counter()
                engine.step()
                walls.append(time.perf_counter() - t)
                record("end")
                rows.append((n_running, dict((k, sum(v)) for k, v in phases.items()), list(events)))
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            decode = [(w, ph, ev) for w, (n, ph, ev) in zip(walls, rows)
                      if n == b and ("graph.replay" in ph or not torch.cuda.is_available())][2:-2]
            gaps, busy, parts = [], [], defaultdict(list)
            for (_, _, ev), (_, _, ev_next) in zip(decode, decode[1:]) if torch.cuda.is_available() else ():
                start, end = dict(ev)["start"], dict(ev)["end"]
                busy.append(start.elapsed_time(end))
                marks = dict(ev)
                parts["before replay"].append(start.elapsed_time(marks["replay"]) / 1e3)
                parts["replay"].append(marks["replay"].elapsed_time(marks["replayed"]) / 1e3)
                parts["after replay"].append(marks["replayed"].elapsed_time(end) / 1e3)
                gaps.append(end.elapsed_time(dict(ev_next)["start"]))
            med = lambda xs: 1e3 * statistics.median(xs) if xs else float("nan")  # noqa: E731
            print(f"{preset} batch {b}: {len(decode)} decode steps, wall {med([w for w, _, _ in decode]):.3f} ms; "
                  f"GPU from execute to step end {med(busy) / 1e3:.3f} ms, idle gap to the next step "
                  f"{med(gaps) / 1e3:.3f} ms", flush=True)
            if busy:  # does the step's device time drift as the batch decodes?
                q = max(1, len(busy) // 4)
                print(f"    GPU time per step: first quarter {med(busy[:q]) / 1e3:.3f} ms, last quarter "
                      f"{med(busy[-q:]) / 1e3:.3f} ms", flush=True)
            for k, v in parts.items():
                print(f"    GPU {k:16s} {med(v):8.3f} ms", flush=True)
            for k in sorted(decode[0][1]):
                print(f"    {k:20s} {med([ph.get(k, 0.0) for _, ph, _ in decode]):8.3f} ms", flush=True)
            last = [s.token_ids[-2] for s in seqs]  # the inputs of the last decode step
            first = [s.token_ids[input_len] for s in seqs]  # the inputs of the first
            print(f"    distinct input tokens: first decode step {len(set(first))}, last {len(set(last))} of {b}")
            if torch.cuda.is_available() and engine.runner.graphs:
                key = engine.runner._graph_key(b, -(-(input_len + output_len - 1) // engine.runner.block_size))
                graph = engine.runner.graphs[key].graph
                print(f"    last step's graph replayed alone: {replay_ms(graph, 20):.3f} ms back to back", flush=True)
                isolated = []
                for _ in range(20):  # the GPU idles before each replay, as after an engine step's host sync
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    torch.cuda.synchronize()
                    start.record()
                    graph.replay()
                    end.record()
                    end.synchronize()
                    isolated.append(start.elapsed_time(end))
                print(f"    ... and after an idle GPU each time: {statistics.median(isolated):.3f} ms", flush=True)
                if prof is not None:
                    kernel_table(prof, 4)
                    with profile(activities=[ProfilerActivity.CUDA]) as alone:
                        for _ in range(4):
                            graph.replay()
                        torch.cuda.synchronize()
                    kernel_time_difference(prof, alone)
                ids = engine.runner.graphs[key].batch.input_ids  # a view of the graph's static input buffer
                saved, varied = ids.clone(), []
                for _ in range(20):  # new token ids each replay (new routing), positions and tables kept
                    with torch.inference_mode():
                        ids.copy_(torch.randint(0, vocab, ids.shape, device=ids.device))
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    graph.replay()
                    end.record()
                    end.synchronize()
                    varied.append(start.elapsed_time(end))
                with torch.inference_mode():
                    ids.copy_(saved)
                print(f"    ... with new random token ids each replay: {statistics.median(varied):.3f} ms", flush=True)
    finally:
        torch.cuda.CUDAGraph.replay = replay
        engine.shutdown()
    del engine
    gc.collect()  # the first engine of a process is caught in a cycle of torch._dynamo's lazy import frames (its __init__
    # frame among them; measured on the CPU): without this a second preset can find the GPU still full
    torch.cuda.empty_cache()



def timed_steps(engine, phases, label: str, profile_step: int | None = None):
    """Runs the engine until its requests finish; prints each step's wall, GPU and host phase times, profiles
    one step (kernels, and host functions by cProfile)."""
    walls, gpus, kinds, host = [], [], [], []
    while engine.has_unfinished_requests():
        for v in phases.values():
            v.clear()
        sched = engine.scheduler
        prefill_rows = sum(1 for s in sched.waiting) if sched.waiting else 0
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        prof = profiler = None
        if profile_step is not None and len(walls) == profile_step:
            prof = profile(activities=[ProfilerActivity.CUDA])
            prof.start()
            profiler = cProfile.Profile()  # host time of the same step (it inflates the wall clock)
            profiler.enable()
        torch.cuda.synchronize()
        start.record()
        t = time.perf_counter()
        engine.step()
        end.record()
        end.synchronize()
        walls.append(time.perf_counter() - t)
        if profiler is not None:
            profiler.disable()
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
            print(f"  {label}: host profile of step {profile_step}, by own time", flush=True)
            print("\n".join(line for line in text.getvalue().splitlines() if line.strip()), flush=True)
        gpus.append(start.elapsed_time(end) / 1e3)
        kinds.append(f"{len(sched.running)} running, {prefill_rows} waiting before")
        host.append(", ".join(f"{k} {sum(v) * 1e3:.1f}" for k, v in sorted(phases.items())))
        if prof is not None:
            prof.stop()
            print(f"  {label}: profiled step {profile_step}", flush=True)
            kernel_table(prof, 1)
    print(f"  {label}: {len(walls)} steps, total wall {sum(walls) * 1e3:.1f} ms", flush=True)
    for i, (w, g, k) in enumerate(zip(walls, gpus, kinds)):
        if i < 8 or i == len(walls) - 1:
            print(f"    step {i:3d}: wall {w * 1e3:8.2f} ms, GPU (synchronised) {g * 1e3:8.2f} ms  [{k}]; host ms: "
                  f"{host[i]}", flush=True)
    return walls


def prefill(preset: str, budget: int, input_len=512, batch=64, piecewise_graphs=True, quantization="none"):
    """Prefill steps (64 prompts at once) and mixed steps (60 decoding + 4 new prompts) of a chunk budget."""
    engine = LLMEngine(EngineConfig(model=preset, random_weights=True, max_num_seqs=256,
                                    max_model_len=input_len + 300, max_num_batched_tokens=budget,
                                    piecewise_graphs=piecewise_graphs, quantization=quantization))
    phases = defaultdict(list)
    for obj, name in ((engine.runner, "execute"), (engine.sampler, "sample"), (engine, "_read_back"),
                      (engine.scheduler, "schedule")):
        timed(obj, name, phases)
    rng = random.Random(0)
    vocab = engine.model_config.vocab_size
    prompt = lambda: [rng.randrange(vocab) for _ in range(input_len)]  # noqa: E731
    try:
        print(f"{preset}, chunk budget {budget}, piecewise graphs {'on' if piecewise_graphs else 'off'}, "
              f"quantization {quantization}", flush=True)
        for rnd in range(2):  # round 0 compiles and warms; round 1 is measured and profiled
            for i in range(batch):
                engine.add_request(f"p{rnd}-{i}", prompt(), SamplingParams(max_tokens=1, ignore_eos=True))
            # profile the second step of round 1 (the first may still carry round 0's tail), or its only one
            steps = -(-batch * input_len // budget)
            walls = timed_steps(engine, phases, f"prefill round {rnd}, {batch} x {input_len}",
                                min(1, steps - 1) if rnd else None)
        total = batch * input_len
        print(f"  prefill: {total} tokens in {sum(walls) * 1e3:.1f} ms = {total / sum(walls):.0f} tok/s", flush=True)
        # The serving steady state: 60 sequences decoding while 4 prompts arrive.
        for rnd in range(2):
            for i in range(60):
                engine.add_request(f"d{rnd}-{i}", prompt(), SamplingParams(max_tokens=40, ignore_eos=True))
            while len(engine.scheduler.waiting):
                engine.step()
            for _ in range(4):
                engine.step()
            for i in range(4):
                engine.add_request(f"m{rnd}-{i}", prompt(), SamplingParams(max_tokens=2, ignore_eos=True))
            walls = timed_steps(engine, phases, f"mixed round {rnd}: 60 decoding + 4 new prompts", 0 if rnd else None)
    finally:
        engine.shutdown()
    del engine
    gc.collect()  # the first engine of a process is caught in a cycle of torch._dynamo's lazy import frames (its __init__
    # frame among them; measured on the CPU): without this a second preset can find the GPU still full
    torch.cuda.empty_cache()



def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["step-phases", "prefill"])
    p.add_argument("presets", nargs="*")
    p.add_argument("--sync", action="store_true", help="step-phases: read each step back before the next")
    p.add_argument("--budget", type=int, nargs="+", default=[2048, 8192], help="prefill: chunk budgets")
    p.add_argument("--quantization", default="none", choices=["none", "fp8"], help="fp8 = quantised at load")
    p.add_argument("--batch", type=positive_int, default=64, help="prefill: prompts per round (512 tokens each)")
    p.add_argument("--no-piecewise-graphs", action="store_true", help="prefill: steps that prefill run eagerly")
    p.add_argument("--no-expert-metrics", action="store_true",
                   help="step-phases: without per-expert counts and MoE timing (their cost: run with and without)")
    args = p.parse_intermixed_args(argv)  # flags before or after the presets
    if args.command == "step-phases":
        for preset in args.presets or ["olmoe-1b-7b", "qwen3-30b-a3b"]:
            step_phases(preset, async_scheduling=not args.sync, quantization=args.quantization,
                        expert_metrics=not args.no_expert_metrics)
    else:
        for preset in args.presets or ["olmoe-1b-7b"]:
            for budget in args.budget:
                prefill(preset, budget, batch=args.batch, piecewise_graphs=not args.no_piecewise_graphs,
                        quantization=args.quantization)


if __name__ == "__main__":
    main()

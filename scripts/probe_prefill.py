"""Where the time of prefill and mixed (prefill + decode) engine steps goes, for random-weight presets on the GPU.

The serving benchmark at concurrency 64 spends about a third of its time outside pure decode steps; this probe
times those steps: wall clock, GPU time from the step's first to its last kernel, kernels launched, and the kernel
table of one profiled step.

    python scripts/probe_prefill.py [--budget=N] [preset ...]      (default: olmoe-1b-7b, budgets 2048 and 8192)
"""

import cProfile
import io
import pstats
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from model.engine import EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from probe_step_phases import kernel_table, timed  # noqa: E402


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


def probe(preset: str, budget: int, input_len=512, batch=64):
    engine = LLMEngine(EngineConfig(model=preset, random_weights=True, max_num_seqs=256,
                                    max_model_len=input_len + 300, max_num_batched_tokens=budget))
    phases = defaultdict(list)
    for obj, name in ((engine.runner, "execute"), (engine.sampler, "sample"), (engine, "_read_back"),
                      (engine.scheduler, "schedule")):
        timed(obj, name, phases)
    rng = random.Random(0)
    vocab = engine.model_config.vocab_size
    prompt = lambda: [rng.randrange(vocab) for _ in range(input_len)]  # noqa: E731
    try:
        print(f"{preset}, chunk budget {budget}", flush=True)
        for rnd in range(2):  # round 0 compiles and warms; round 1 is measured and profiled
            for i in range(batch):
                engine.add_request(f"p{rnd}-{i}", prompt(), SamplingParams(max_tokens=1, ignore_eos=True))
            walls = timed_steps(engine, phases, f"prefill round {rnd}, {batch} x {input_len}", 1 if rnd else None)
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
    torch.cuda.empty_cache()


if __name__ == "__main__":
    budgets = [int(a.split("=")[1]) for a in sys.argv[1:] if a.startswith("--budget=")] or [2048, 8192]
    for p in [a for a in sys.argv[1:] if not a.startswith("--")] or ["olmoe-1b-7b"]:
        for budget in budgets:
            probe(p, budget)

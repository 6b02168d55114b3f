"""Does a server's first burst of concurrent requests pay one-time costs that later bursts do not? Runs the same
kind of burst (64 prompts of 512 random tokens, 32 output tokens, all at once) three times on one engine and
prints each burst's time and its slowest steps (synchronous steps, so each step's wall time is its own).

    python scripts/probe_first_use.py [preset]      (default: olmoe-1b-7b)
"""

import random
import sys
import time

from model.engine import EngineConfig, LLMEngine, SamplingParams


def burst(engine, tag: str, rng: random.Random, n=64, input_len=512, output_len=32):
    vocab = engine.model_config.vocab_size
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    for i in range(n):
        engine.add_request(f"{tag}-{i}", [rng.randrange(vocab) for _ in range(input_len)], params)
    schedule, steps = engine.scheduler.schedule, []

    def recording_schedule():
        out = schedule()
        prefill = sum(s.num_new_tokens for s in out.scheduled if s.num_new_tokens > 1 or not s.samples)
        steps.append([len(out.scheduled), prefill, 0.0])
        return out

    engine.scheduler.schedule = recording_schedule
    started = time.perf_counter()
    try:
        while engine.has_unfinished_requests():
            t = time.perf_counter()
            engine.step()
            if steps:
                steps[-1][2] = time.perf_counter() - t
    finally:
        engine.scheduler.schedule = schedule
    total = time.perf_counter() - started
    slow = sorted(range(len(steps)), key=lambda i: -steps[i][2])[:6]
    print(f"{tag}: {total:.2f} s, {len(steps)} steps; slowest (index: sequences, prefill tokens, ms): "
          + ", ".join(f"{i}: {steps[i][0]}, {steps[i][1]}, {1e3 * steps[i][2]:.0f}" for i in sorted(slow)), flush=True)


if __name__ == "__main__":
    preset = sys.argv[1] if len(sys.argv) > 1 else "olmoe-1b-7b"
    engine = LLMEngine(EngineConfig(model=preset, random_weights=True, max_num_seqs=256, max_model_len=1024,
                                    max_num_batched_tokens=8192, async_scheduling=False))
    rng = random.Random(0)
    burst(engine, "warm-8", rng, n=8, output_len=16)  # what bench_serve's sweep warms its server with
    for k in range(3):
        burst(engine, f"burst{k}", rng)
    burst(engine, "burst-odd", rng, n=64, input_len=397)  # new prompt length: new chunk shapes

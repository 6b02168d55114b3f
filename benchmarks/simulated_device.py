"""A stand-in for the GPU in host-side profiles: the engine's own Python (scheduler, prefix cache, detokenizer,
service) runs for real on the CPU, while the model's forward pass is replaced by a device clock.

Every step gets a device time from a cost model (an OLMoE-1B-7B H100 by default: decode graph 7.7 ms at batch 64,
eager prefill ~3.8 µs a token; benchmarks/NOTES.md), queued behind the previous step as a CUDA stream would queue it,
and the read-back of a step's sampled ids waits, without the GIL, until the clock says it is done. Launching costs
host time too, and holds the GIL as the real launch does: an eager step (any step with a prefill chunk) launches
~800 kernels for ~25 ms of host time (NOTES.md "Prefill steps": 22–30 ms for a mixed OLMoE step), each a bit of
Python followed by a torch call that releases the GIL, so a thread that wants the GIL takes it at every launch;
a decode step replays a CUDA graph (~0.5 ms of host time).

    engine = simulated_engine(SimulatedDevice())   # an LLMEngine on the CPU whose forward pass is simulated
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from model.engine import EngineConfig, LLMEngine
from model.engine.model_runner import step_items
from model.presets import PRESETS, TINY

SIM_PRESET = "sim-olmoe-vocab"  # the tiny model's shape with OLMoE's vocabulary (bodies and logits of real size)


@dataclass
class SimulatedDevice:
    decode_fixed_ms: float = 4.5        # decode graph replay: fixed part ...
    decode_per_seq_ms: float = 0.05     # ... plus per sequence (7.7 ms at 64)
    eager_fixed_ms: float = 1.5         # eager step: fixed part of the device time ...
    eager_per_token_us: float = 3.8     # ... plus per new token (8192 tokens: ~33 ms)
    eager_host_ms: float = 25.0         # host time to launch an eager step (GIL held between launches)
    eager_launches: int = 800
    decode_host_ms: float = 0.5
    decode_launches: int = 10

    def __post_init__(self):
        self.free_at = 0.0  # when the device finishes what was queued so far (time.perf_counter)
        self._scratch = torch.zeros(1)
        self.steps: list[dict] = []
        start = time.perf_counter()
        for _ in range(1000):
            self._scratch.add_(0)
        self._launch_s = (time.perf_counter() - start) / 1000  # the torch call's own host time

    def launch(self, is_decode: bool, num_seqs: int, num_tokens: int) -> float:
        """Spend the launch's host time and queue its device time; returns when the device will be done."""
        start = time.perf_counter()
        if is_decode:
            host, launches = self.decode_host_ms, self.decode_launches
            device = self.decode_fixed_ms + self.decode_per_seq_ms * num_seqs
        else:
            host, launches = self.eager_host_ms, self.eager_launches
            device = self.eager_fixed_ms + self.eager_per_token_us * num_tokens / 1e3
        per_launch = max(0.0, host / 1e3 / launches - self._launch_s)
        for _ in range(launches):
            until = time.perf_counter() + per_launch
            while time.perf_counter() < until:  # Python between launches: holds the GIL
                pass
            self._scratch.add_(0)  # the launch itself: a torch call, which releases the GIL
        launched = time.perf_counter()
        # the device starts the step's kernels as they arrive, after the previous step's
        self.free_at = max(launched, max(self.free_at, start) + device / 1e3)
        self.steps.append(dict(start=start, launched=launched, done=self.free_at, decode=is_decode, seqs=num_seqs,
                               tokens=num_tokens))
        return self.free_at


def simulated_engine(device: SimulatedDevice, **config) -> LLMEngine:
    """An LLMEngine of the tiny model's shape with OLMoE's vocabulary, on the CPU, whose steps run on `device`."""
    PRESETS.setdefault(SIM_PRESET, dict(PRESETS[TINY], vocab_size=50304, eos_token_id=50279))
    torch.set_num_threads(1)
    settings = dict(model=SIM_PRESET, random_weights=True, device="cpu", max_num_seqs=64,
                    max_num_batched_tokens=8192, num_kv_blocks=20000, expert_metrics=False)
    engine = LLMEngine(EngineConfig(**{**settings, **config}))
    vocab = engine.model_config.vocab_size
    logits = torch.zeros(engine.config.max_num_seqs * 2, vocab)
    logits[:, 1000] = 1.0  # greedy picks one ordinary id

    def execute(out, force_eager=False, sampled_before=None):
        items = step_items(out)
        if not out.is_decode:
            engine.runner.build_batch(items)  # the real host work of an eager step's inputs
        engine._sim_done = device.launch(out.is_decode, len(out.scheduled), out.num_tokens)
        return logits[: sum(rows for *_, rows in items)]

    engine.runner.execute = execute
    sample, read_back = engine._sample, engine._read_back

    def sample_then_tag(forward):
        launched = sample(forward)
        launched.sim_done = engine._sim_done
        return launched

    def wait_then_read(step):
        wait = step.sim_done - time.perf_counter()
        if wait > 0:
            time.sleep(wait)  # the copy event's synchronize: no GIL
        read_back(step)

    engine._sample, engine._read_back = sample_then_tag, wait_then_read
    return engine


"""Kernels and GPU time of one eager decode forward (olmoe-1b-7b, random weights) with the small-op fusion of
model/layers/fusion.py off and on: does torch.compile take effect, and what does it save?"""

import collections

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from model.engine.config import EngineConfig
from model.engine.llm_engine import LLMEngine
from model.layers import fusion

engine = LLMEngine(EngineConfig(model="olmoe-1b-7b", random_weights=True, device="cuda", enforce_eager=True,
                                max_model_len=1024, gpu_memory_utilization=0.5))
runner = engine.runner
for batch_size in (1, 64):
    batch = runner._pad_batch(batch_size, 8)
    for enabled in (False, True):
        fusion.set_enabled(enabled)
        with torch.inference_mode(), fusion.for_graph_capture():  # compiled at every size, as in decode graphs
            for _ in range(3):
                runner.model(batch, runner.kv_cache)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                runner.model(batch, runner.kv_cache)
                torch.cuda.synchronize()
        kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
        busy_us = sum(e.device_time for e in kernels)
        names = collections.Counter(e.name[:60] for e in kernels)
        print(f"batch {batch_size} fusion {'on ' if enabled else 'off'}: {len(kernels)} kernels, {busy_us:.0f} us busy; "
              f"top: {names.most_common(6)}", flush=True)

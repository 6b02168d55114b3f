#!/usr/bin/env python
"""Metric truth (issues 5 and 7): is `staticmoe_moe_tensor_core_utilization` what the MoE kernels achieve?

Gauge side — exactly what the service exports. The engine serves B sequences that all decode together, so every
sampled step has T = B tokens. The (seconds, FLOPs) pairs of those steps (`engine.moe_stats().timed`; CUDA events
around each SparseMoeBlock of an eager sampled step) go through the service's own `ServiceMetrics.update_moe`, and
the gauge is read back from its registry (Σ FLOPs ÷ Σ seconds ÷ the device's dense bf16 peak).

Independent side — the kernel benchmark's method on the same work. Forward hooks copy each MoE block's input of
one such step (after the block ran, outside the timed window). Offline, the router and top-k run untimed, then
`fused_moe` on those exact activations and routings is timed per layer with the kernel benchmark's Timer (CUDA
events, L2 flushed before each call, median) and summed over the layers; FLOPs come from the config
(2·k·H·2I + 2·k·I·H per token per layer), not from the engine. Pass: gauge ÷ independent within ±10%.
Also reported, to explain a gap: the whole block (router + top-k + fused_moe + shared expert) under the same Timer,
and all layers' fused_moe replayed back to back in one CUDA graph (how a graph-captured decode step runs them).

    python benchmarks/utilization_truth.py --preset olmoe-1b-7b [--batch 64] [--out DIR]
"""

import argparse
import dataclasses
import gc
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.bench_engine import environment, make_prompts  # noqa: E402
from benchmarks.bench_timing import Timer, graph_ms  # noqa: E402
from model.engine import EngineConfig, LLMEngine, SamplingParams  # noqa: E402
from model.kernels import fused_moe, softmax_topk  # noqa: E402
from service.metrics import MoeLayout, ServiceMetrics, dense_bf16_peak_flops  # noqa: E402

TOLERANCE = 0.10
NOMINAL_CPU_PEAK = 1e12  # CPU smoke runs: any peak works, the ratio does not depend on it


def moe_flops_per_token(config) -> float:
    """Routed-expert GEMM FLOPs of one token in one MoE layer, from the model config alone."""
    k, h, i = config.top_k, config.hidden_size, config.moe_intermediate_size
    return 2.0 * k * h * 2 * i + 2.0 * k * i * h


def gauge_value(pairs: list[tuple[float, float]], snapshot, peak: float) -> float:
    """The utilization the service's metrics code reports for these timed pairs."""
    metrics = ServiceMetrics("truth")
    layers = len(snapshot.expert_tokens_total) or 1
    metrics.configure_moe(MoeLayout(layer_labels=[str(i) for i in range(layers)],
                                    experts_per_layer=[len(r) for r in snapshot.expert_tokens_total] or [1],
                                    device_name=snapshot.device_name, peak_flops=peak, expert_counters=False,
                                    expert_window_metrics=False))
    metrics.update_moe(dataclasses.replace(snapshot, timed=list(pairs)))
    return metrics.registry.get_sample_value("staticmoe_moe_tensor_core_utilization")


class InputCapture:
    """Copies each MoE block's input during the first step whose `armed` flag is set (in the forward *post*-hook,
    registered after the engine's timing hooks, so the copy falls outside the timed window)."""

    def __init__(self, blocks):
        self.inputs: dict[int, torch.Tensor] = {}
        self.armed = False
        self.handles = [b.register_forward_hook(self._hook(i)) for i, b in enumerate(blocks)]
        self.num_blocks = len(blocks)

    def _hook(self, index):
        def hook(module, args, output):
            if self.armed and index not in self.inputs:
                self.inputs[index] = args[0].detach().clone()  # [B, H]
        return hook

    @property
    def complete(self) -> bool:
        return len(self.inputs) == self.num_blocks

    def remove(self):
        for h in self.handles:
            h.remove()


def serve_decode_batch(engine, prompts, output_len) -> tuple[list[tuple[float, float]], InputCapture, object]:
    """All prompts at once, greedy, EOS ignored. Returns the timed pairs of steps in which exactly len(prompts)
    sequences decoded, the captured MoE inputs of one such step, and the last stats snapshot."""
    batch = len(prompts)
    blocks = engine.model.moe_blocks()
    capture = InputCapture(blocks)
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    engine.moe_stats()  # drop pairs of earlier work
    state = {"decode_batch": False}
    schedule = engine.scheduler.schedule

    def recording_schedule():
        out = schedule()
        state["decode_batch"] = out.is_decode and len(out.scheduled) == batch
        capture.armed = state["decode_batch"] and not capture.complete
        return out

    engine.scheduler.schedule = recording_schedule
    pairs, snapshot = [], None
    try:
        for i, p in enumerate(prompts):
            engine.add_request(f"truth-{i}", p, params)
        while engine.has_unfinished_requests():
            engine.step()
            # step() synced on the sampled ids, so a sampled step's events are complete and harvested now
            snapshot = engine.moe_stats()
            if state["decode_batch"]:
                pairs += snapshot.timed
            state["decode_batch"] = capture.armed = False
    finally:
        engine.scheduler.schedule = schedule
        capture.remove()
    return pairs, capture, snapshot


@torch.inference_mode()
def independent_seconds(engine, capture: InputCapture, budget_ms: float) -> dict:
    """Per-step seconds of the captured step's MoE work, measured outside the engine three ways."""
    device = engine.device
    timer = Timer(device, budget_ms)
    blocks = engine.model.moe_blocks()
    routed = []
    for index, block in enumerate(blocks):
        x = capture.inputs[index]
        weights, ids = softmax_topk(block.gate(x), block.top_k, block.renormalize)  # [B, k] f32, i32
        routed.append((block, x, weights, ids))
    out = {
        "fused_moe_timer": sum(timer.median_ms(lambda b=b, x=x, w=w, i=i: fused_moe(
            x, b.experts.gate_up_proj, b.experts.down_proj, w, i)) for b, x, w, i in routed) / 1e3,
        "block_timer": sum(timer.median_ms(lambda b=b, x=x: b(x)) for b, x, _, _ in routed) / 1e3,
    }
    if device.type == "cuda":
        def all_layers():
            for b, x, w, i in routed:
                fused_moe(x, b.experts.gate_up_proj, b.experts.down_proj, w, i)
        out["fused_moe_graph"] = graph_ms(all_layers) / 1e3
    return out


def measure_utilization(engine, prompts, output_len: int, peak_flops: float | None = None,
                        budget_ms: float = 50.0) -> dict:
    """Gauge vs independent utilization at T = len(prompts) decode tokens per step (see the module doc)."""
    batch = len(prompts)
    pairs, capture, snapshot = serve_decode_batch(engine, prompts, output_len)
    device_name = snapshot.device_name
    peak = peak_flops or dense_bf16_peak_flops(device_name)
    peak_source = "--peak-flops" if peak_flops else "service.metrics.DENSE_BF16_PEAKS" if peak else "nominal (CPU)"
    peak = peak or NOMINAL_CPU_PEAK
    step_flops = batch * moe_flops_per_token(engine.model_config) * len(engine.model.moe_blocks())
    result = dict(batch=batch, output_len=output_len, device=device_name, peak_flops=peak, peak_source=peak_source,
                  flops_per_step=step_flops, timing_every=engine.config.moe_timing_every,
                  gauge_steps=len(pairs))
    if not pairs or not capture.complete:
        result["error"] = (f"no sampled step with {batch} decoding sequences (timed pairs: {len(pairs)}, captured "
                           f"layers: {len(capture.inputs)}): raise --output-len above "
                           f"{2 * engine.config.moe_timing_every}")
        return result
    engine_flops = [f for _, f in pairs]
    result["engine_flops_match"] = all(abs(f - step_flops) <= 1e-9 * step_flops for f in engine_flops)
    gauge = gauge_value(pairs, snapshot, peak)
    seconds = [s for s, _ in pairs]
    result["gauge"] = dict(utilization=gauge, seconds_per_step_mean=sum(seconds) / len(seconds),
                           per_step_utilization=[f / s / peak for s, f in pairs])
    result["independent"] = {name: dict(seconds_per_step=s, utilization=step_flops / s / peak)
                             for name, s in independent_seconds(engine, capture, budget_ms).items()}
    reference = result["independent"]["fused_moe_timer"]["utilization"]
    result["ratio_gauge_to_independent"] = gauge / reference
    result["within_tolerance"] = abs(gauge / reference - 1.0) <= TOLERANCE
    return result


def markdown_lines(r: dict) -> list[str]:
    if "error" in r:
        return [f"utilization truth: {r['error']}"]
    lines = [f"Metric truth at T = {r['batch']} decode tokens per step ({r['gauge_steps']} sampled steps, peak "
             f"{r['peak_flops'] / 1e12:.0f} TFLOP/s from {r['peak_source']}):", "",
             "| measurement | MoE s/step | utilization | gauge ÷ this |", "|---|---|---|---|",
             f"| gauge (`staticmoe_moe_tensor_core_utilization`) | {r['gauge']['seconds_per_step_mean'] * 1e3:.3f} ms "
             f"| {r['gauge']['utilization']:.4f} | 1.00 |"]
    names = {"fused_moe_timer": "fused_moe, kernel-benchmark Timer (reference)",
             "block_timer": "whole MoE block (router + top-k + fused_moe), Timer",
             "fused_moe_graph": "fused_moe of all layers in one CUDA graph"}
    for key, m in r["independent"].items():
        lines.append(f"| {names[key]} | {m['seconds_per_step'] * 1e3:.3f} ms | {m['utilization']:.4f} | "
                     f"{r['gauge']['utilization'] / m['utilization']:.2f} |")
    verdict = "PASS" if r["within_tolerance"] else "FAIL"
    lines += ["", f"gauge ÷ reference = {r['ratio_gauge_to_independent']:.3f} → {verdict} (±{TOLERANCE:.0%}); "
              f"engine FLOPs per step equal the config's count: {r['engine_flops_match']}."]
    return lines


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="olmoe-1b-7b")
    p.add_argument("--batch", type=int, default=64, help="sequences decoding together (T per step)")
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=96, help="decode steps (>= 2 x the timing period)")
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--peak-flops", type=float, help="override the per-device dense bf16 peak")
    p.add_argument("--budget-ms", type=float, default=50.0, help="Timer budget per layer and method")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    env = environment(args.device)
    engine = LLMEngine(EngineConfig(model=args.preset, random_weights=True, device=args.device,
                                    max_num_seqs=args.batch, max_num_batched_tokens=args.max_num_batched_tokens,
                                    max_model_len=args.input_len + args.output_len))
    prompts = make_prompts(args.batch, args.input_len, engine.model_config.vocab_size)
    result = measure_utilization(engine, prompts, args.output_len, args.peak_flops, args.budget_ms)
    del engine
    gc.collect()
    report = dict(env=env, preset=args.preset, args=vars(args), truth=result)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"utilization_truth_{env['date'][:10]}_{args.preset}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1))
    text = "\n".join([f"# MoE utilization metric truth — {args.preset}, {env['device']}, commit `{env['commit']}`, "
                      f"{env['date']}", "", *markdown_lines(result), ""])
    stem.with_suffix(".md").write_text(text)
    print(text)
    print(f"wrote {stem}.json and .md")
    return 0 if result.get("within_tolerance") else 1


if __name__ == "__main__":
    sys.exit(main())

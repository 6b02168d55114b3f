#!/usr/bin/env python
"""Metric truth (issues 5 and 7): is `staticmoe_moe_tensor_core_utilization` what the MoE kernels achieve?

Gauge side — exactly what the service exports. The engine serves B sequences that all decode together, so every
sampled decode step runs the decode CUDA graph of B rows (B is one of the graph batch sizes when it equals
max_num_seqs or a power of two; otherwise its padding rows route to no expert, model/layers/padding_rows.py, and
only the B real rows count on both sides). The engine times only
`fused_moe` of each MoE layer, by event-record nodes captured into that graph (model/engine/moe_timer.py); the
(seconds, FLOPs) pairs of those steps (`engine.moe_stats().timed`) go through the service's own
`ServiceMetrics.update_moe`, and the gauge is read back from its registry (Σ FLOPs ÷ Σ seconds ÷ the device's
dense bf16 peak).

Independent side — the same work, timed the same way outside the engine. Right after one sampled step, that step
is run again eagerly on the graph's own static inputs (untimed; it rewrites the same KV slots with the same values,
expert counting off) with hooks copying each MoE block's input. Then the router and top-k run on those inputs, and
`fused_moe` of each layer is captured in its own CUDA graph between two external timing events, replayed, and its
median elapsed time summed over the layers (the reference). FLOPs come from the config (2·k·H·2I + 2·k·I·H per row
per layer), not from the engine. Pass: gauge ÷ reference within ±10%. Also reported, to explain a gap: back-to-back
replays of each layer's fused_moe graph (bench_timing.graph_ms), all layers in one graph, the kernel benchmark's
Timer (eager, L2 flushed), and the whole block (router + top-k + fused_moe + shared expert) under that Timer.
Cost: the served B-row and 1-row decode graphs (with their event nodes) are replayed against twins captured without
them, and the host time of reading a sample is reported.
On the CPU (smoke runs) there are no graphs: sampled steps are eager and wall-clock timed, and the reference is the
Timer.

    python benchmarks/utilization_truth.py --preset olmoe-1b-7b [--batch 64] [--out DIR]
"""

import argparse
import contextlib
import dataclasses
import gc
import json
import statistics
import sys
from pathlib import Path

import torch

from benchmarks.bench_engine import environment, make_prompts
from benchmarks.bench_timing import Timer, graph_ms
from benchmarks.moe_cases import moe_flops
from model.engine import EngineConfig, LLMEngine, SamplingParams
from model.engine.moe_timer import time_experts
from model.kernels import fused_moe
from model.layers import fusion
from service.metrics import MoeLayout, ServiceMetrics, dense_peak_flops

ROOT = Path(__file__).resolve().parents[1]

TOLERANCE = 0.10
NOMINAL_CPU_PEAK = 1e12  # CPU smoke runs: any peak works, the ratio does not depend on it


def gauge_value(pairs: list[tuple[float, float]], snapshot, peak: float) -> float:
    """The utilization the service's metrics code reports for these timed pairs."""
    metrics = ServiceMetrics("truth")
    layers = len(snapshot.expert_tokens_total) or 1
    metrics.configure_moe(MoeLayout(layer_labels=[str(i) for i in range(layers)],
                                    experts_per_layer=[len(r) for r in snapshot.expert_tokens_total] or [1],
                                    device_name=snapshot.device_name, peak_flops=peak, expert_counters=False,
                                    expert_window_metrics=False, precision=snapshot.precision or "bfloat16"))
    metrics.update_moe(dataclasses.replace(snapshot, timed=list(pairs)))
    return metrics.registry.get_sample_value("staticmoe_moe_tensor_core_utilization")


class StepRecorder:
    """Remembers the inputs of the step that just ran: the replayed graph's static batch, or the eager batch."""

    def __init__(self, runner):
        self.runner = runner
        self.batch, self.graph_rows, self.graph = None, None, None
        self._replay, self._build = runner._replay, runner.build_batch
        runner._replay, runner.build_batch = self._on_replay, self._on_build

    def _on_replay(self, g, out, *args):
        self.batch, self.graph_rows, self.graph = g.batch, g.batch.input_ids.shape[0], g
        return self._replay(g, out, *args)

    def _on_build(self, items):
        self.batch = self._build(items)
        self.graph_rows = self.graph = None
        return self.batch

    def remove(self):
        self.runner._replay, self.runner.build_batch = self._replay, self._build


@contextlib.contextmanager
def uncounted(blocks):
    """For runs that serve no tokens: the experts' token counters are put back as they were afterwards."""
    loads = [b.experts.expert_load.clone() for b in blocks]
    try:
        yield
    finally:
        for b, load in zip(blocks, loads):
            b.experts.expert_load.copy_(load)


@torch.inference_mode()
def block_inputs_of(engine, batch) -> list[torch.Tensor]:
    """Each MoE block's input [rows, H] in `batch`, by running it again eagerly (untimed, not counted). It rewrites the
    K/V of its own slots with the same values, so the engine's state is unchanged."""
    blocks = engine.model.moe_blocks()
    inputs: list[torch.Tensor | None] = [None] * len(blocks)
    handles = [b.register_forward_pre_hook(lambda m, args, i=i: inputs.__setitem__(i, args[0].detach().clone()))
               for i, b in enumerate(blocks)]
    try:
        with uncounted(blocks), fusion.for_graph_capture():  # the graph's kernels: the inputs the graph computed
            engine.model(batch, engine.runner.kv_cache)
    finally:
        for h in handles:
            h.remove()
    return inputs


def serve_decode_batch(engine, prompts, output_len) -> dict:
    """All prompts at once, greedy, EOS ignored. Collects the timed pairs of sampled steps in which exactly
    len(prompts) sequences decoded, and the MoE block inputs of the first of them."""
    batch = len(prompts)
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    before = engine.moe_stats()  # also drops pairs of earlier work
    shape = {}
    schedule = engine.scheduler.schedule

    def recording_schedule():
        out = schedule()
        shape["decode_batch"] = out.is_decode and len(out.scheduled) == batch
        shape["decode"] = out.is_decode
        return out

    engine.scheduler.schedule = recording_schedule
    recorder = StepRecorder(engine.runner)
    got = dict(pairs=[], graph_rows=set(), inputs=None, graph=None, decode_steps=0, eager_decode_steps=0,
               snapshot=before)
    try:
        for i, p in enumerate(prompts):
            engine.add_request(f"truth-{i}", p, params)
        while engine.has_unfinished_requests():
            shape.clear()
            engine.step()
            if shape.get("decode"):
                got["decode_steps"] += 1
                got["eager_decode_steps"] += recorder.graph_rows is None
            # step() read the sampled ids back, so a sampled step's events are complete and harvested now
            snapshot = engine.moe_stats()
            got["snapshot"] = snapshot
            if shape.get("decode_batch") and snapshot.timed:
                got["pairs"] += snapshot.timed
                got["graph_rows"].add(recorder.graph_rows)
                if got["inputs"] is None:
                    got["inputs"] = [x[: len(prompts)] for x in block_inputs_of(engine, recorder.batch)]
                    got["graph"] = recorder.graph
    finally:
        engine.scheduler.schedule = schedule
        recorder.remove()
    after = got["snapshot"]
    got["skipped"] = after.timed_skipped_total - before.timed_skipped_total
    reads = after.timing_read_host_seconds_total - before.timing_read_host_seconds_total
    got["read_host_us_per_sample"] = 1e6 * reads / max(1, len(got["pairs"]))
    return got


def graph_event_ms(fn, replays: int = 30) -> float:
    """Median time of `fn` captured in a CUDA graph between two external timing events (event-record nodes), one
    replay at a time: how the engine times fused_moe inside its decode graphs."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm up outside the capture
            fn()
    torch.cuda.current_stream().wait_stream(side)
    start = torch.cuda.Event(enable_timing=True, external=True)
    end = torch.cuda.Event(enable_timing=True, external=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        start.record()
        fn()
        end.record()
    times = []
    for _ in range(replays + 2):
        graph.replay()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times[2:])


@torch.inference_mode()
def independent_seconds(engine, inputs: list[torch.Tensor], budget_ms: float) -> dict:
    """Per-step seconds of the recorded step's MoE work, measured outside the engine several ways."""
    device = engine.device
    timer = Timer(device, budget_ms)
    routed = []
    for block, x in zip(engine.model.moe_blocks(), inputs):
        weights, ids = block.route(x)  # [T, k] f32, i32
        if block.fused_shared_slots:  # the shared MLP runs inside the timed op (model/layers/shared_expert_fusion)
            weights, ids = block._with_shared_slots(x, weights, ids)
        routed.append((block, x, weights, ids))

    def layer_call(b, x, w, i):
        e = b.experts  # FP8 experts pass their block scales (model/layers/fp8.py)
        scales = dict(w13_scale=e.gate_up_proj_scale_inv, w2_scale=e.down_proj_scale_inv) \
            if hasattr(e, "gate_up_proj_scale_inv") else {}
        return lambda: fused_moe(x, e.gate_up_proj, e.down_proj, w, i, **scales)

    out = {}
    if device.type == "cuda":
        out["fused_moe_graph_events"] = sum(graph_event_ms(layer_call(*r)) for r in routed) / 1e3
        out["fused_moe_graph_replays"] = sum(graph_ms(layer_call(*r)) for r in routed) / 1e3

        def all_layers():
            for r in routed:
                layer_call(*r)()
        out["fused_moe_graph_all_layers"] = graph_ms(all_layers) / 1e3
    out["fused_moe_timer"] = sum(timer.median_ms(layer_call(*r)) for r in routed) / 1e3
    with uncounted([b for b, _, _, _ in routed]):  # these calls are no served tokens
        out["block_timer"] = sum(timer.median_ms(lambda b=b, x=x: b(x)) for b, x, _, _ in routed) / 1e3
    return out


@torch.inference_mode()
def event_node_cost(engine, graphs: dict, replays: int = 30) -> dict:
    """What the timing events cost a decode step: device time of a replay of each served graph (events included)
    against a twin captured from the same static inputs with the timer detached. Replays alternate; medians. The
    expert counters are restored afterwards (these replays serve no tokens). CUDA only."""
    blocks = engine.model.moe_blocks()
    out = {}
    with uncounted(blocks):
        for name, g in graphs.items():
            time_experts(blocks, None)
            try:
                twin = torch.cuda.CUDAGraph()
                with fusion.for_graph_capture(), torch.cuda.graph(twin):  # the served graph's kernels, events aside
                    engine.runner.graph_forward(g.batch)
            finally:
                engine.moe.timer.attach(blocks)
            times = {"with_events": [], "without": []}
            for _ in range(replays):
                timed = g.timed if g.timed is not None else g.graph  # the variant sampled steps replay
                for key, graph in (("with_events", timed), ("without", twin)):
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    graph.replay()
                    end.record()
                    end.synchronize()
                    times[key].append(start.elapsed_time(end))
            with_events, without = statistics.median(times["with_events"]), statistics.median(times["without"])
            out[name] = dict(with_events_ms=with_events, without_ms=without, overhead=with_events / without - 1.0)
            del twin
    return out


def measure_utilization(engine, prompts, output_len: int, peak_flops: float | None = None,
                        budget_ms: float = 50.0) -> dict:
    """Gauge vs independent utilization at T = len(prompts) decode tokens per step (see the module doc)."""
    batch = len(prompts)
    got = serve_decode_batch(engine, prompts, output_len)
    pairs, snapshot = got["pairs"], got["snapshot"]
    device_name = snapshot.device_name
    fp8 = snapshot.precision == "fp8"
    peak = peak_flops or dense_peak_flops(device_name, snapshot.precision)
    table = "service.metrics.DENSE_FP8_PEAKS" if fp8 else "service.metrics.DENSE_BF16_PEAKS"
    peak_source = "--peak-flops" if peak_flops else table if peak else "nominal (CPU)"
    peak = peak or NOMINAL_CPU_PEAK
    rows_seen = got["graph_rows"]
    rows = next(iter(rows_seen)) if len(rows_seen) == 1 and None not in rows_seen else batch
    mc = engine.model_config  # real rows only; a fused shared MLP adds its slots to the timed op's work
    step_flops = batch * sum(moe_flops(1, mc.top_k + b.fused_shared_slots, mc.hidden_size, mc.moe_intermediate_size)
                             for b in engine.model.moe_blocks())
    result = dict(batch=batch, graph_rows=rows, graph_replayed=None not in rows_seen and bool(rows_seen),
                  output_len=output_len, device=device_name, peak_flops=peak, peak_source=peak_source,
                  flops_per_step=step_flops, timing_every=engine.config.moe_timing_every, gauge_steps=len(pairs),
                  decode_steps=got["decode_steps"], eager_decode_steps=got["eager_decode_steps"],
                  skipped_samples=got["skipped"], read_host_us_per_sample=got["read_host_us_per_sample"])
    if not pairs or got["inputs"] is None:
        result["error"] = (f"no sampled step with {batch} decoding sequences (timed pairs: {len(pairs)}): raise "
                           f"--output-len above {2 * engine.config.moe_timing_every}")
        return result
    if len(rows_seen) > 1:
        result["error"] = f"sampled steps ran graphs of different row counts {sorted(map(str, rows_seen))}"
        return result
    result["engine_flops_match"] = all(abs(f - step_flops) <= 1e-9 * step_flops for _, f in pairs)
    gauge = gauge_value(pairs, snapshot, peak)
    seconds = [s for s, _ in pairs]
    result["gauge"] = dict(utilization=gauge, seconds_per_step_mean=sum(seconds) / len(seconds),
                           per_step_utilization=[f / s / peak for s, f in pairs])
    result["independent"] = {name: dict(seconds_per_step=s, utilization=step_flops / s / peak)
                             for name, s in independent_seconds(engine, got["inputs"], budget_ms).items()}
    result["reference"] = "fused_moe_graph_events" if "fused_moe_graph_events" in result["independent"] \
        else "fused_moe_timer"
    reference = result["independent"][result["reference"]]["utilization"]
    result["reference_utilization"] = reference
    result["ratio_gauge_to_independent"] = gauge / reference
    result["within_tolerance"] = abs(gauge / reference - 1.0) <= TOLERANCE
    if got["graph"] is not None and engine.device.type == "cuda":
        g = got["graph"]
        width = g.batch.block_tables.shape[1]
        graphs = {f"{rows} rows": g, "1 row": engine.runner.graphs.get((1, width))}
        result["event_nodes"] = event_node_cost(engine, {k: v for k, v in graphs.items() if v is not None})
    return result


METHOD_NAMES = {
    "fused_moe_graph_events": "fused_moe per layer in its own CUDA graph, between event-record nodes (as the engine)",
    "fused_moe_graph_replays": "fused_moe per layer in its own CUDA graph, back-to-back replays (graph_ms)",
    "fused_moe_graph_all_layers": "fused_moe of all layers in one CUDA graph (graph_ms)",
    "fused_moe_timer": "fused_moe per layer, kernel-benchmark Timer (eager, L2 flushed)",
    "block_timer": "whole MoE block (router + top-k + fused_moe + shared expert), Timer",
}


def markdown_lines(r: dict) -> list[str]:
    if "error" in r:
        return [f"utilization truth: {r['error']}"]
    how = "graph-replayed decode steps" if r["graph_replayed"] else "eager steps (no CUDA graphs)"
    lines = [f"Metric truth at T = {r['batch']} decode tokens per step (graph of {r['graph_rows']} rows; "
             f"{r['gauge_steps']} sampled {how}; {r['eager_decode_steps']} of {r['decode_steps']} decode steps "
             f"eager; peak {r['peak_flops'] / 1e12:.0f} TFLOP/s from {r['peak_source']}):", "",
             "| measurement | fused_moe s/step | utilization | gauge ÷ this |", "|---|---|---|---|",
             f"| gauge (`staticmoe_moe_tensor_core_utilization`) | {r['gauge']['seconds_per_step_mean'] * 1e3:.3f} ms "
             f"| {r['gauge']['utilization']:.4f} | 1.00 |"]
    for key, m in r["independent"].items():
        name = METHOD_NAMES[key] + (" **(reference)**" if key == r["reference"] else "")
        lines.append(f"| {name} | {m['seconds_per_step'] * 1e3:.3f} ms | {m['utilization']:.4f} | "
                     f"{r['gauge']['utilization'] / m['utilization']:.2f} |")
    verdict = "PASS" if r["within_tolerance"] else "FAIL"
    lines += ["", f"gauge ÷ reference = {r['ratio_gauge_to_independent']:.3f} → {verdict} (±{TOLERANCE:.0%}); "
              f"engine FLOPs per step equal the config's count: {r['engine_flops_match']}; host time to read one "
              f"sample's events: {r['read_host_us_per_sample']:.0f} µs; samples skipped: {r['skipped_samples']}."]
    for name, c in r.get("event_nodes", {}).items():
        lines.append(f"Timing event nodes, decode graph of {name}: {c['with_events_ms']:.3f} ms per replay with them, "
                     f"{c['without_ms']:.3f} ms without ({c['overhead']:+.1%}).")
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
    p.add_argument("--timing-every", type=int, default=4, help="the engine's moe_timing_every (sampling period)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    env = environment(args.device)
    engine = LLMEngine(EngineConfig(model=args.preset, random_weights=True, device=args.device,
                                    max_num_seqs=args.batch, max_num_batched_tokens=args.max_num_batched_tokens,
                                    max_model_len=args.input_len + args.output_len,
                                    moe_timing_every=args.timing_every))
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

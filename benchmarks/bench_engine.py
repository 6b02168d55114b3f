"""Offline engine benchmark (no HTTP): output tokens/s of LLMEngine against HF transformers `generate`.

For each preset (random weights, bf16): prompts of `--input-len` random tokens, `--output-len` greedy tokens with
EOS ignored, all requests of a batch submitted at once; throughput = output tokens ÷ total time (prefill included).
The HF baseline runs `generate` (experts_implementation="grouped_mm", sdpa attention) on the *same* weights (its
parameters are views of ours) and the same prompts. Decode step time is the median wall time of the engine steps
in which all requests of the batch decode together; its floor is the bytes such a step must read — weights of the
experts the batch touches (expected count from the measured per-expert load), attention/router/lm_head weights,
the batch's KV cache — over the device copy bandwidth measured in the same run (2·bytes ÷ time of a large
device-to-device copy). The device time of each step is measured in the run itself, by CUDA events recorded before
its forward pass and after its sampling, so step − device time is the time the GPU waits for the host. (Replaying
a step's graph on its own is not a stand-in: its attention ran 1.6× faster than in the engine, see NOTES.) Writes bench_engine_<date>.json and .md to --out (default
benchmarks/results).

FP8: `--quantization none fp8` runs every preset in both precisions in one session (FP8 = the same random weights
quantised per 128x128 block at load); rows are named `preset` and `preset+fp8`, and a closing table gives the FP8 ÷
bf16 ratios (tokens/s, decode step) and both KV-cache capacities in tokens. HF transformers runs on bf16 weights
only (it would need its own FP8 copy), so FP8 rows have no HF column.

Bounded: the whole command stays within --time-budget seconds (default 420). Each preset gets an equal share of
what is left; our runs stop (marked truncated) at the share's end, HF `generate` runs get `max_time` = what is
left (at most --hf-max-seconds each) and are skipped when too little is.

    python benchmarks/bench_engine.py [--presets olmoe-1b-7b qwen3-30b-a3b] [--batches 1 16 64 256]
                                      [--hf-batches 1 16 64] [--quantization none fp8] [--time-budget 420]
                                      [--quick] [--out DIR]
"""

import argparse
import datetime
import gc
import json
import statistics
import os
import subprocess
import time
from pathlib import Path

import torch

from model.engine import EngineConfig, LLMEngine, SamplingParams
from model.kernels import jit_monitor
from model.layers import shared_expert_fusion
from model.kv_capacity import values_per_token_per_layer
from model.presets import PRESETS
from benchmarks.precision_compare import precision_table
from model.families import FAMILIES
from model.weight_map import parameter_sources

# Our parameter name -> transformers' where they differ (the inverse of the family's checkpoint renames).
HF_NAMES = {"gpt_oss": lambda key: key.replace(".mlp.gate.", ".mlp.router.")}

ROOT = Path(__file__).resolve().parents[1]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=["olmoe-1b-7b", "qwen3-30b-a3b"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 16, 64, 256])
    p.add_argument("--hf-batches", nargs="+", type=int, default=[1, 16, 64])
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--decode-batches", nargs="+", type=int, default=[1, 64], help="batches whose decode step is timed")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--quantization", nargs="+", default=["none"], choices=["none", "fp8"],
                   help="precisions to run each preset in (fp8: quantised at load)")
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--no-async-scheduling", action="store_true", help="read each step's ids back before the next")
    p.add_argument("--no-expert-metrics", action="store_true", help="serve without expert counters/timing")
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.93,
                   help="0.93 leaves qwen3-30b-a3b room for 256 × 576 tokens of KV cache on an 80 GB H100")
    p.add_argument("--time-budget", type=float, default=420.0, help="seconds for the whole command")
    p.add_argument("--hf-max-seconds", type=float, default=60.0, help="max_time of one HF generate call")
    p.add_argument("--quick", action="store_true", help="batches 1 and 64, HF at 1 only")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args()
    if args.quick:
        args.batches, args.hf_batches = [1, 64], [1]
    return args


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device, nbytes=None, iters=10) -> float:
    """Bytes moved per second (read + write) by a large device-to-device copy."""
    nbytes = nbytes or (1 << 30 if torch.device(device).type == "cuda" else 1 << 24)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    t = time.perf_counter()
    for _ in range(iters):
        dst.copy_(src)
    sync(device)
    return 2 * nbytes * iters / (time.perf_counter() - t)


def make_prompts(n, length, vocab, seed=0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, length), generator=g).tolist()


# ---- ours ---------------------------------------------------------------------------------------------------------
def run_engine(engine, prompts, output_len, tag, deadline: float | None = None) -> dict:
    """All prompts at once; returns throughput, the median wall time of the steps in which every request decodes
    and (on CUDA) their median device time. Past `deadline` (perf_counter) the requests are aborted and the result
    is marked truncated."""
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    shapes, marks = [], []  # per schedule: (is_decode, batch); per launched step: [schedule index, start, end]
    schedule, execute, sample = engine.scheduler.schedule, engine.runner.execute, engine.sampler.sample
    cuda = engine.device.type == "cuda"

    def recording_schedule():
        out = schedule()
        shapes.append((out.is_decode, len(out.scheduled)))
        return out

    def marked_execute(*args, **kwargs):
        start = torch.cuda.Event(enable_timing=True)
        start.record()
        marks.append([len(shapes) - 1, start, None])
        return execute(*args, **kwargs)

    def marked_sample(*args, **kwargs):
        ids = sample(*args, **kwargs)
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        marks[-1][2] = end
        return ids

    engine.scheduler.schedule = recording_schedule
    if cuda:
        engine.runner.execute, engine.sampler.sample = marked_execute, marked_sample
    truncated = False
    compiles_before = jit_monitor.specializations_after_start()
    try:
        sync(engine.device)
        start = time.perf_counter()
        for i, p in enumerate(prompts):
            engine.add_request(f"{tag}-{i}", p, params)
        steps, produced, t = [], 0, time.perf_counter()
        while engine.has_unfinished_requests():
            produced += sum(len(o.new_token_ids) for o in engine.step())
            now = time.perf_counter()  # step() returns after an earlier step's sampled ids reached the host
            steps.append(now - t)
            t = now
            if deadline is not None and now > deadline and not truncated:
                truncated = True
                for i in range(len(prompts)):
                    engine.abort_request(f"{tag}-{i}")
        total = time.perf_counter() - start
    finally:
        engine.scheduler.schedule, engine.runner.execute, engine.sampler.sample = schedule, execute, sample
    full_decode = [is_decode and n == len(prompts) for is_decode, n in shapes]
    decode = [dt for dt, full in zip(steps, full_decode) if full]
    device = [s.elapsed_time(e) for i, s, e in marks if full_decode[i] and e is not None]
    return dict(batch=len(prompts), output_tokens=produced, seconds=total, tok_s=produced / total,
                steps=len(steps), decode_steps=len(decode), truncated=truncated,
                max_decode_batch=max((n for is_decode, n in shapes if is_decode), default=0),
                decode_step_ms=1e3 * statistics.median(decode) if decode else None,
                decode_device_ms=statistics.median(device) if device else None,
                # Triton kernels first specialised inside this run: their compiles are in `seconds`
                kernel_specializations=jit_monitor.specializations_after_start() - compiles_before)


def expected_experts_touched(load: list[int], top_k: int, batch: int) -> float:
    """E[distinct experts hit by `batch` tokens] if each token picks expert e with probability k·p_e. No load
    counted (expert metrics off): uniform routing, p_e = 1/E, so one token still reads k experts, not all E."""
    total = sum(load)
    if total == 0:
        load, total = [1] * len(load), len(load)
    return sum(1.0 - max(0.0, 1.0 - top_k * c / total) ** batch for c in load)


def decode_floor(engine, batch, context_len, bandwidth) -> dict:
    """Bytes one decode step of `batch` sequences at `context_len` must read, and that over the bandwidth."""
    model = engine.model
    loads = engine.moe_stats().window_expert_tokens
    experts = dense = 0
    head = model.head_weight() if hasattr(model, "head_weight") else None  # the embedding itself when tied
    for name, p in model.named_parameters():
        if ".experts." in name:
            continue
        if name == "model.embed_tokens.weight" and p is not head:
            dense += batch * p.shape[1] * p.element_size()  # only the batch's rows are read (tied: the lm_head too)
        else:
            dense += p.numel() * p.element_size()
    for block, load in zip(model.moe_blocks(), loads):  # bytes of the stored weights: FP8 + block scales, or bf16
        shared = block.fused_shared_slots  # a shared MLP moved into the experts: read at every step
        per_expert = sum(p.numel() * p.element_size() for p in block.experts.parameters()) / (block.num_experts
                                                                                               + shared)
        experts += (expected_experts_touched(load, block.top_k, batch) + shared) * per_expert
    kv = batch * context_len * engine.runner.bytes_per_block // engine.config.block_size
    total = experts + dense + kv
    return dict(bytes_experts=experts, bytes_dense=dense, bytes_kv=kv, bytes_total=total,
                floor_ms=1e3 * total / bandwidth)


def bench_ours(preset, args, prompts, bandwidth, deadline: float, quantization: str = "none"
               ) -> tuple[LLMEngine, dict]:
    cfg = EngineConfig(model=preset, random_weights=True, dtype=args.dtype, device=args.device,
                       quantization=quantization,
                       max_num_seqs=max(args.batches), max_num_batched_tokens=args.max_num_batched_tokens,
                       max_model_len=args.input_len + args.output_len, enforce_eager=args.enforce_eager,
                       async_scheduling=not args.no_async_scheduling,
                       expert_metrics=not args.no_expert_metrics, gpu_memory_utilization=args.gpu_memory_utilization)
    t = time.perf_counter()
    engine = LLMEngine(cfg)
    init_s = time.perf_counter() - t
    run_engine(engine, prompts[:4], min(8, args.output_len), "warmup")
    out = dict(dtype=str(engine.dtype).removeprefix("torch."), quantization=quantization,
               experts_precision=engine.moe_stats().precision, init_seconds=init_s,
               weight_gib=sum(p.numel() * p.element_size() for p in engine.model.parameters()) / 2**30,
               num_kv_blocks=engine.num_kv_blocks, kv_capacity_tokens=engine.num_kv_blocks * engine.config.block_size,
               kv_capacity_uncompressed_tokens=uncompressed_capacity(engine),
               num_cuda_graphs=engine.runner.num_graphs,
               kernel_path=engine.kernel_path, throughput={}, decode={}, skipped=[])
    for b in args.batches:
        if time.perf_counter() > deadline:
            out["skipped"].append(b)
            print(f"  ours  batch {b:4d}: skipped (time budget)", flush=True)
            continue
        r = run_engine(engine, prompts[:b], args.output_len, f"b{b}", deadline)
        out["throughput"][b] = r
        compiled = r["kernel_specializations"]
        print(f"  ours  batch {b:4d}: {r['tok_s']:9.1f} tok/s  ({r['seconds']:.2f} s, {r['steps']} steps, "
              f"decode step {r['decode_step_ms'] or float('nan'):.2f} ms, largest decode batch "
              f"{r['max_decode_batch']}{', TRUNCATED' if r['truncated'] else ''}"
              f"{f', {compiled} Triton kernels specialised in the run' if compiled else ''})", flush=True)
        if b in args.decode_batches and r["decode_step_ms"] is not None:
            context = args.input_len + args.output_len // 2
            floor = decode_floor(engine, b, context, bandwidth)
            floor["step_ms"] = r["decode_step_ms"]
            floor["ratio_to_floor"] = r["decode_step_ms"] / floor["floor_ms"]
            floor["device_ms"] = r["decode_device_ms"]
            if floor["device_ms"] is not None:
                floor["device_ratio_to_floor"] = floor["device_ms"] / floor["floor_ms"]
                floor["gpu_wait_ms"] = floor["step_ms"] - floor["device_ms"]
            out["decode"][b] = floor
            replay = (f"; device time {floor['device_ms']:.2f} ms = {floor['device_ratio_to_floor']:.2f}x, "
                      f"GPU waits {floor['gpu_wait_ms']:.2f} ms") if floor["device_ms"] is not None else ""
            print(f"  decode batch {b}: {floor['step_ms']:.2f} ms vs floor {floor['floor_ms']:.2f} ms "
                  f"= {floor['ratio_to_floor']:.2f}x{replay}  (experts {floor['bytes_experts'] / 1e9:.2f} GB, "
                  f"dense {floor['bytes_dense'] / 1e9:.2f} GB, KV {floor['bytes_kv'] / 1e9:.2f} GB)", flush=True)
    return engine, out


# ---- HF transformers on the same weights --------------------------------------------------------------------------
def hf_sharing_weights(engine, preset):
    """A transformers model of the preset's config whose parameters are views of the engine's (no copy)."""
    import transformers

    hf_config = transformers.AutoConfig.for_model(**PRESETS[preset])
    mc = engine.model_config
    family = FAMILIES[mc.model_type]
    # gpt-oss supports no sdpa in transformers (its sinks): eager attention there
    attention = "eager" if mc.model_type == "gpt_oss" else "sdpa"
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(
            hf_config, dtype=engine.dtype, attn_implementation=attention, experts_implementation="grouped_mm")
    q_size, kv_size = mc.num_heads * mc.head_dim, mc.num_kv_heads * mc.head_dim
    views = {}
    # a shared MLP fused into the experts (model/layers/shared_expert_fusion.py) comes back as HF has it (a copy)
    for name, param in shared_expert_fusion.unfused_named_parameters(engine.model):
        for piece in parameter_sources(name, tuple(param.shape), q_size, kv_size, family.expert_layout)[0]:
            # gpt-oss's interleaved gate_up is a copy (its layout is no view of ours): more memory than the others
            view = piece.export(param) if piece.export else param[piece.index] if piece.index else param
            key = HF_NAMES.get(mc.model_type, lambda key: key)(piece.key)
            views[key] = view
            # DeepSeek's (and GLM's) MLP of n_shared experts: HF's `shared_experts`, our `shared_expert`
            views[key.replace(".mlp.shared_expert.", ".mlp.shared_experts.")] = view
    for name, _ in list(hf.named_parameters()):
        if name not in views:
            raise KeyError(f"no engine weight for HF parameter {name}")
        module_name, _, leaf = name.rpartition(".")
        hf.get_submodule(module_name)._parameters[leaf] = torch.nn.Parameter(views[name], requires_grad=False)
    for name, buffer in list(hf.named_buffers()):  # DeepSeek-V3's router correction bias: HF buffer, our parameter
        if buffer.device.type == "meta" and name in views:
            module_name, _, leaf = name.rpartition(".")
            hf.get_submodule(module_name)._buffers[leaf] = views[name]
    rotary = hf.model.rotary_emb
    hf.model.rotary_emb = type(rotary)(config=hf.config).to(engine.device)
    left = [n for n, t in [*hf.named_parameters(), *hf.named_buffers()] if t.device.type == "meta"]
    if left:
        raise RuntimeError(f"HF tensors left on meta: {left[:5]}")
    return hf.eval()


@torch.inference_mode()
def run_hf(hf, prompts, output_len, device, max_time: float | None = None) -> dict:
    """HF `generate`, greedy, all prompts in one batch; `max_time` (s) stops it early (marked truncated)."""
    ids = torch.tensor(prompts, device=device)
    mask = torch.ones_like(ids)
    sync(device)
    t = time.perf_counter()
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=output_len, min_new_tokens=output_len,
                      do_sample=False, pad_token_id=0, max_time=max_time)
    sync(device)
    seconds = time.perf_counter() - t
    produced = (out.shape[1] - ids.shape[1]) * ids.shape[0]
    return dict(batch=len(prompts), output_tokens=produced, seconds=seconds, tok_s=produced / seconds,
                truncated=out.shape[1] - ids.shape[1] < output_len)


def release_engine_cache(engine) -> None:
    """Give our KV cache and CUDA graphs' memory back (the weights stay: HF shares them)."""
    engine.runner.graphs.clear()
    engine.runner.kv_cache = None
    gc.collect()
    if engine.device.type == "cuda":
        torch.cuda.empty_cache()


def run_hf_baseline(engine, preset: str, prompts: list[list[int]], batches: list[int], output_len: int, *,
                    deadline: float | None = None, max_seconds: float = 60.0, min_seconds: float = 5.0,
                    check_prompt_len: int = 64, log=print) -> dict:
    """HF transformers `generate` (experts_implementation="grouped_mm", sdpa) on the engine's own weights and
    `prompts[:b]` for each b in `batches`. Releases the engine's KV cache and graphs first (the engine cannot
    step afterwards). Each call gets max_time = min(max_seconds, deadline - now); a batch is skipped when less
    than `min_seconds` is left. Returns {"hf": {b: run_hf result}, "skipped": [b...], "hf_logits_rel_diff": x}."""
    release_engine_cache(engine)
    hf = hf_sharing_weights(engine, preset)
    result = dict(hf={}, skipped=[])
    result["hf_logits_rel_diff"] = first_logits_agree(engine, hf, prompts[0][:check_prompt_len])
    log(f"  HF vs ours, last-position logits: max rel diff {result['hf_logits_rel_diff']:.3g}")
    run_hf(hf, prompts[:1], 4, engine.device)  # warm-up
    for b in batches:
        left = max_seconds if deadline is None else min(max_seconds, deadline - time.perf_counter())
        if left < min_seconds:
            result["skipped"].append(b)
            log(f"  HF    batch {b:4d}: skipped (time budget)")
            continue
        try:
            r = run_hf(hf, prompts[:b], output_len, engine.device, max_time=left)
        except torch.OutOfMemoryError as err:
            result["hf"][b] = dict(batch=b, error=f"out of memory: {str(err)[:200]}")
            torch.cuda.empty_cache()
            log(f"  HF    batch {b:4d}: out of memory")
            continue
        result["hf"][b] = r
        log(f"  HF    batch {b:4d}: {r['tok_s']:9.1f} tok/s  ({r['seconds']:.2f} s"
            f"{', TRUNCATED by max_time' if r['truncated'] else ''})")
    del hf
    gc.collect()
    return result


@torch.inference_mode()
def first_logits_agree(engine, hf, prompt) -> float:
    """max |ours - HF| / max |HF| of the last-position logits of one prompt: the weight sharing is right."""
    ids = torch.tensor([prompt], device=engine.device)
    expected = hf(ids).logits[0, -1].float()
    runner = engine.runner
    n, groups = -(-len(prompt) // runner.block_size), runner.num_groups  # blocks of its own in each KV-cache group
    tables = [list(range(groups + g * n, groups + (g + 1) * n)) for g in range(groups)]
    batch = runner.build_batch([(prompt, 0, tables, True)])
    cache = torch.zeros(engine.model.kv_cache_shape(groups * (1 + n), runner.block_size),
                        dtype=engine.dtype, device=engine.device)
    actual = engine.model(batch, cache)[0]
    return float((actual - expected).abs().max() / expected.abs().max())


def latent_note(ours: dict) -> str:
    """" (N without latent compression)" where MLA's latent cache holds more tokens than an uncompressed one would."""
    compressed, plain = ours.get("kv_capacity_tokens"), ours.get("kv_capacity_uncompressed_tokens")
    return "" if compressed is None or compressed == plain else f" ({plain} without latent compression)"


def uncompressed_capacity(engine) -> int:
    """The tokens the same KV-cache bytes would hold without MLA's latent compression (model/kv_capacity.py); the
    engine's own capacity for other attention kinds."""
    cached, uncompressed = values_per_token_per_layer(engine.model_config)
    return engine.num_kv_blocks * engine.config.block_size * cached // uncompressed


def bench_preset(preset, args, bandwidth, deadline: float, quantization: str = "none") -> dict:
    """Ours in the first 45% of the time until `deadline`, HF in the rest (bf16 only)."""
    vocab = PRESETS[preset]["vocab_size"]
    prompts = make_prompts(max(args.batches + args.hf_batches), args.input_len, vocab)
    skip_hf = args.skip_hf or quantization != "none"
    print(f"== {preset} {quantization} ({deadline - time.perf_counter():.0f} s left for it)", flush=True)
    ours_deadline = time.perf_counter() + 0.45 * (deadline - time.perf_counter())
    engine, ours = bench_ours(preset, args, prompts, bandwidth, deadline if skip_hf else ours_deadline, quantization)
    if quantization == "fp8" and engine.device.type == "cuda":
        from model.kernels.fp8_linear import dense_fp8_path

        ours["fp8_dense_linears"] = {"scaled_mm": "torch._scaled_mm 1x128 x 128x128 blocks",
                                     "cuda": "CUDA FP8 GEMM2 kernel with one expert (csrc/moe/dense_fp8.cu)",
                                     "triton": "Triton block-scaled GEMM (model/kernels/triton_fp8_gemm.py)",
                                     "reference": "dequantise-then-matmul fallback"}[dense_fp8_path(engine.device)]
    print(f"  weights {ours['weight_gib']:.1f} GiB ({ours['experts_precision']} experts"
          f"{', dense: ' + ours['fp8_dense_linears'] if 'fp8_dense_linears' in ours else ''}), KV cache "
          f"{ours['kv_capacity_tokens']} tokens (uncompressed keys and values: "
          f"{ours['kv_capacity_uncompressed_tokens']})", flush=True)
    result = dict(ours=ours, hf={}, speedup={})
    if not skip_hf:
        result.update(run_hf_baseline(engine, preset, prompts, args.hf_batches, args.output_len, deadline=deadline,
                                      max_seconds=args.hf_max_seconds, log=lambda m: print(m, flush=True)))
        for b, r in result["hf"].items():
            mine = ours["throughput"].get(b)
            if mine and "tok_s" in r:
                result["speedup"][b] = mine["tok_s"] / r["tok_s"]
    del engine
    gc.collect()
    if torch.device(args.device).type == "cuda":
        torch.cuda.empty_cache()
    return result


def environment(device) -> dict:
    import transformers

    # The GPU machine's copy of the tree carries no usable git history: the caller names the commit there.
    commit = os.environ.get("STATICMOE_COMMIT")
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                    check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            commit = "unknown"
    name = torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else "cpu"
    return dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), commit=commit,
                device=name, torch=torch.__version__, transformers=transformers.__version__)


def _cell(value, fmt="{:.1f}", suffix=""):
    return "—" if value is None else fmt.format(value) + suffix


def markdown(report) -> str:
    env, a = report["env"], report["args"]
    lines = [f"# Engine benchmark — {env['date']}", "",
             f"commit `{env['commit']}`, {env['device']}, torch {env['torch']}, transformers {env['transformers']}; "
             f"input {a['input_len']}, output {a['output_len']}, greedy, EOS ignored, random weights "
             f"({report['dtype']}); copy bandwidth {report['copy_bandwidth_gbs']:.0f} GB/s (read+write); "
             f"whole run {report['wall_seconds']:.0f} s (budget {a['time_budget']:.0f} s).", ""]
    for preset, r in report["presets"].items():
        o = r["ours"]
        lines += [f"## {preset}", "", f"kernel: {o['kernel_path']}; experts in {o.get('experts_precision', '?')}, "
                  f"weights {o.get('weight_gib', float('nan')):.1f} GiB; {o['num_kv_blocks']} KV blocks = "
                  f"{o.get('kv_capacity_tokens', '?')} tokens of KV cache{latent_note(o)}; "
                  f"{o['num_cuda_graphs']} CUDA graphs, engine start-up {o['init_seconds']:.1f} s.", "",
                  "| batch | ours tok/s | largest decode batch | HF grouped_mm tok/s | speedup |", "|---|---|---|---|---|"]
        for b in sorted({*a["batches"], *([] if a["skip_hf"] else a["hf_batches"])}):
            t, hf = o["throughput"].get(b), r["hf"].get(b)
            ours = ("skipped (time budget)" if b in o.get("skipped", []) else
                    _cell(t and t["tok_s"]) + (" (truncated)" if t and t.get("truncated") else ""))
            theirs = ("skipped (time budget)" if b in r.get("skipped", []) else
                      hf["error"] if hf and "error" in hf else
                      _cell(hf and hf["tok_s"]) + (" (max_time)" if hf and hf.get("truncated") else ""))
            lines.append(f"| {b} | {ours} | {t['max_decode_batch'] if t else '—'} | {theirs} | "
                         f"{_cell(r['speedup'].get(b), suffix='×')} |")
        lines += ["", "| decode batch | step ms | floor ms | step ÷ floor | device ms | device ÷ floor | GPU waits ms |"
                  " experts GB | dense GB | KV GB |", "|---|---|---|---|---|---|---|---|---|---|"]
        for b, d in o["decode"].items():
            lines.append(f"| {b} | {d['step_ms']:.2f} | {d['floor_ms']:.2f} | {d['ratio_to_floor']:.2f}× | "
                         f"{_cell(d.get('device_ms'), '{:.2f}')} | {_cell(d.get('device_ratio_to_floor'), '{:.2f}', '×')} | "
                         f"{_cell(d.get('gpu_wait_ms'), '{:.2f}')} | {d['bytes_experts'] / 1e9:.2f} | "
                         f"{d['bytes_dense'] / 1e9:.2f} | {d['bytes_kv'] / 1e9:.2f} |")
        if "hf_logits_rel_diff" in r:
            lines += ["", f"HF on the shared weights vs ours, last-position logits: max rel diff "
                      f"{r['hf_logits_rel_diff']:.3g}."]
        lines.append("")
    lines += precision_table(report)
    return "\n".join(lines)


def summary(report) -> str:
    """One line per preset: tok/s per batch, speedups, decode step ÷ floor."""
    lines = []
    for preset, r in report["presets"].items():
        o = r["ours"]
        tput = " ".join(f"b{b}={t['tok_s']:.0f}" for b, t in o["throughput"].items())
        hf = " ".join(f"b{b}={h['tok_s']:.1f}" for b, h in r["hf"].items() if "tok_s" in h)
        speed = " ".join(f"b{b}={x:.1f}x" for b, x in r["speedup"].items())
        floor = " ".join(f"b{b}={d['ratio_to_floor']:.2f}x(device {_cell(d.get('device_ratio_to_floor'), '{:.2f}', 'x')})"
                         for b, d in o["decode"].items())
        lines.append(f"SUMMARY {preset}: ours tok/s {tput} | HF {hf or '-'} | speedup {speed or '-'} | "
                     f"step/floor {floor or '-'}")
    return "\n".join(lines)


def main():
    args = parse_args()
    started = time.perf_counter()
    env = environment(args.device)
    bandwidth = copy_bandwidth(args.device)
    print(f"{env}\ncopy bandwidth {bandwidth / 1e9:.0f} GB/s", flush=True)
    report = dict(env=env, args=vars(args), copy_bandwidth_gbs=bandwidth / 1e9, presets={})
    end = started + args.time_budget
    runs = [(preset, q) for preset in args.presets for q in args.quantization]
    for i, (preset, quantization) in enumerate(runs):
        share = (end - time.perf_counter()) / (len(runs) - i)
        name = preset if quantization == "none" else f"{preset}+{quantization}"
        report["presets"][name] = bench_preset(preset, args, bandwidth, time.perf_counter() + share, quantization)
    report["dtype"] = next(iter(report["presets"].values()))["ours"]["dtype"]
    report["wall_seconds"] = time.perf_counter() - started
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"bench_engine_{env['date'][:10]}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str))
    stem.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    print(summary(report))
    print(f"wrote {stem}.json and .md")


if __name__ == "__main__":
    main()

"""FP8 against bf16 in one benchmark session: the comparison rows of bench_engine.py (tokens/s, decode step, weights
and KV-cache tokens of each preset run in both precisions) and of bench_serve.py (output tok/s, TTFT p50 and KV
tokens at the metrics concurrency)."""


def level(levels: list[dict], c: int) -> dict | None:
    return next((s for s in levels if s["max_concurrency"] == c), None)


def precision_table(report) -> list[str]:
    """FP8 ÷ bf16 of each preset run in both precisions: tokens/s per batch, decode step per timed batch, KV tokens;
    and FP8 ÷ HF transformers where the bf16 run measured HF (HF runs in bf16: a cross-precision ratio, labelled so).
    """
    rows = []
    for name, r in report["presets"].items():
        base = report["presets"].get(name.removesuffix("+fp8")) if name.endswith("+fp8") else None
        if base is None:
            continue
        f8, bf, hf = r["ours"], base["ours"], base.get("hf", {})
        tput = ", ".join(f"b{b} {f8['throughput'][b]['tok_s'] / bf['throughput'][b]['tok_s']:.2f}×"
                         for b in f8["throughput"] if b in bf["throughput"])
        step = ", ".join(f"b{b} {bf['decode'][b]['step_ms'] / f8['decode'][b]['step_ms']:.2f}×"
                         for b in f8["decode"] if b in bf["decode"])
        vs_hf = ", ".join(f"b{b} {f8['throughput'][b]['tok_s'] / hf[b]['tok_s']:.1f}×"
                          for b in f8["throughput"] if "tok_s" in hf.get(b, {}))
        rows.append(f"| {name.removesuffix('+fp8')} | {tput or '—'} | {step or '—'} | {vs_hf or '—'} | "
                    f"{bf['weight_gib']:.1f} → {f8['weight_gib']:.1f} | {bf['kv_capacity_tokens']} → "
                    f"{f8['kv_capacity_tokens']} |")
    if not rows:
        return []
    return ["## FP8 against bf16 (same session, same random weights quantised)", "",
            "| preset | tok/s FP8 ÷ bf16 | decode step speed-up (bf16 ms ÷ FP8 ms) | tok/s FP8 ÷ HF bf16 | "
            "weights GiB bf16 → FP8 | KV tokens bf16 → FP8 |", "|---|---|---|---|---|---|", *rows, ""]


def precision_lines(results: dict, c: int) -> list[str]:
    """FP8 ÷ bf16 per preset served both ways: output tok/s and TTFT p50 at concurrency c, KV-cache tokens."""
    lines = []
    for name, r in results.items():
        base = results.get(name.removesuffix("_fp8")) if name.endswith("_fp8") else None
        f8 = level(r.get("serve", {}).get("levels", []), c)
        bf = level((base or {}).get("serve", {}).get("levels", []), c)
        if not (f8 and bf):
            continue
        rate = f", {f8['request_rate']} req/s offered" if f8.get("request_rate") else ""
        lines.append(f"FP8 vs bf16 {name.removesuffix('_fp8')} at c={c}{rate}: output tok/s {f8['output_throughput']:.0f} / "
                     f"{bf['output_throughput']:.0f} = {f8['output_throughput'] / bf['output_throughput']:.2f}x, "
                     f"TTFT p50 {f8['ttft_ms']['p50']:.0f} / {bf['ttft_ms']['p50']:.0f} ms, failed "
                     f"{f8['failed']} / {bf['failed']}, KV tokens {r['offline'].get('kv_capacity_tokens')} / "
                     f"{base['offline'].get('kv_capacity_tokens')}")
    return lines

"""Load-generator numbers: percentiles, the per-level summary (vLLM benchmark_serving definitions), a text table,
and PNG plots of throughput and latency against concurrency.

Definitions (successful requests only):
- TTFT: request sent -> first streamed chunk. E2E latency: request sent -> end of the stream.
- TPOT: (E2E - TTFT) / (output tokens - 1), per request with more than one output token.
- ITL: gaps between consecutive chunks, pooled over all requests.
- Throughputs divide by the level's wall time (first request sent -> last request finished).
"""

from __future__ import annotations

import math
from pathlib import Path

from service.loadgen.client import LevelRun

LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")
LATENCY_TITLES = {"ttft": "time to first token", "tpot": "time per output token", "itl": "inter-token latency",
                  "e2el": "end-to-end latency"}
STATS = ("mean", "p50", "p90", "p99")


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks (numpy's default)."""
    if not values:
        raise ValueError("percentile of an empty list")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"q must be in [0, 100], got {q}")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def distribution_ms(values_s: list[float]) -> dict[str, float | None]:
    """mean/p50/p90/p99 in milliseconds; None when there is no sample."""
    if not values_s:
        return {k: None for k in STATS}
    ms = [1e3 * v for v in values_s]
    return {"mean": sum(ms) / len(ms), "p50": percentile(ms, 50), "p90": percentile(ms, 90),
            "p99": percentile(ms, 99)}


def summarize(run: LevelRun) -> dict:
    ok = [r for r in run.results if r.ok]
    failed = [r for r in run.results if not r.ok]
    errors: dict[str, int] = {}
    for r in failed:
        errors[r.error] = errors.get(r.error, 0) + 1
    input_tokens = sum(r.prompt_len for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    duration = max(run.duration_s, 1e-9)
    tpots = [(r.latency_s - r.ttft_s) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    return {
        "max_concurrency": run.max_concurrency,
        "request_rate": None if math.isinf(run.request_rate) else run.request_rate,
        "num_requests_sent": len(run.results),
        "completed": len(ok),
        "failed": len(failed),
        "not_sent": run.not_sent,
        "errors": errors,
        "output_len_mismatches": sum(1 for r in ok if r.output_tokens != r.expected_output_len),
        "prompt_len_mismatches": sum(1 for r in ok if r.prompt_len != r.expected_prompt_len),
        "duration_s": run.duration_s,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(ok) / duration,
        "output_throughput": output_tokens / duration,
        "total_token_throughput": (input_tokens + output_tokens) / duration,
        "ttft_ms": distribution_ms([r.ttft_s for r in ok]),
        "tpot_ms": distribution_ms(tpots),
        "itl_ms": distribution_ms([gap for r in ok for gap in r.itl_s]),
        "e2el_ms": distribution_ms([r.latency_s for r in ok]),
        "slots_busy": slots_busy(run),
        "timeline": timeline(run),
    }


def slots_busy(run: LevelRun) -> float | None:
    """For a closed-loop level (a fixed concurrency c): the share of the c request slots that held a request over
    the level, sum of request latencies (send to [DONE]) / (duration x c). Near 1 when the client keeps c requests
    in flight; lowered by wall time with free slots (a client that is slow to send, shards ending apart, the drain
    at the level's end) and by requests that fail early, which deflates req/s and tok/s. A server that stalls while
    requests are in flight does not lower it (their latencies grow instead)."""
    if not run.max_concurrency or not run.results or run.duration_s <= 0:
        return None
    return sum(r.latency_s for r in run.results) / (run.duration_s * run.max_concurrency)


def timeline(run: LevelRun) -> list[list[float]]:
    """Every completed request as [sent, TTFT, end to end] in seconds, sent counted from the level's first request
    (failed or not) and sorted by it: where a TTFT distribution comes from (arrival waves, a stalled step) can be read off it."""
    ok = sorted((r for r in run.results if r.ok), key=lambda r: r.sent_at)
    if not ok:
        return []
    t0 = min(r.sent_at for r in run.results)  # failed requests count for the start, not in the list
    return [[round(r.sent_at - t0, 4), round(r.ttft_s, 4), round(r.latency_s, 4)] for r in ok]


def _fmt(value, scale: float = 1.0) -> str:
    return "—" if value is None else f"{value * scale:.1f}"


def _share(value) -> str:
    return "—" if value is None else f"{value:.2f}"


def table(levels: list[dict]) -> str:
    """A markdown table, one row per level."""
    head = ("| concurrency | rate | ok/failed | req/s | out tok/s | total tok/s | TTFT ms mean/p50/p99 | "
            "TPOT ms mean/p50/p99 | ITL ms mean/p50/p99 | E2E s mean/p99 | slots busy |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for s in levels:
        lat = {m: s[f"{m}_ms"] for m in LATENCY_METRICS}
        e2e = lat["e2el"]
        lines.append(
            f"| {s['max_concurrency'] or '∞'} | {s['request_rate'] or 'inf'} | {s['completed']}/{s['failed']} | "
            f"{s['request_throughput']:.2f} | {s['output_throughput']:.1f} | {s['total_token_throughput']:.1f} | "
            + " | ".join("/".join(_fmt(lat[m][k]) for k in ("mean", "p50", "p99")) for m in ("ttft", "tpot", "itl"))
            + f" | {_fmt(e2e['mean'], 1e-3)}/{_fmt(e2e['p99'], 1e-3)} | {_share(s.get('slots_busy'))} |")
    return "\n".join(lines)


def plot_sweep(levels: list[dict], stem: Path, title: str, baseline: dict[int, float] | None = None,
               baseline_label: str = "baseline") -> list[Path]:
    """`<stem>_throughput.png` (output and total tok/s, optional baseline tok/s by batch size) and
    `<stem>_latency.png` (mean/p50/p99 of TTFT, TPOT, ITL, E2E), all against concurrency (log axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = sorted((s for s in levels if s["max_concurrency"]), key=lambda s: s["max_concurrency"])
    if not levels:
        raise ValueError("plots need levels with a fixed max_concurrency")
    conc = [s["max_concurrency"] for s in levels]
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_name(stem.name + "_throughput.png"), stem.with_name(stem.name + "_latency.png")]

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(conc, [s["output_throughput"] for s in levels], "o-", label="output tok/s")
    ax.plot(conc, [s["total_token_throughput"] for s in levels], "s--", label="total (input+output) tok/s")
    if baseline:
        sizes = sorted(baseline)
        ax.plot(sizes, [baseline[b] for b in sizes], "^:", color="gray", label=baseline_label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(conc, [str(c) for c in conc])
    ax.set_xlabel("concurrency (requests in flight)")
    ax.set_ylabel("tokens / s")
    ax.set_title(f"{title}: throughput")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, metric in zip(axes.flat, LATENCY_METRICS):
        for stat, style in (("mean", "o-"), ("p50", "s--"), ("p99", "^:")):
            values = [s[f"{metric}_ms"][stat] for s in levels]
            ax.plot(conc, [math.nan if v is None else v for v in values], style, label=stat)
        ax.set_xscale("log", base=2)
        ax.set_xticks(conc, [str(c) for c in conc])
        ax.set_title(LATENCY_TITLES[metric])
        ax.set_xlabel("concurrency")
        ax.set_ylabel("ms")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{title}: latency")
    fig.tight_layout()
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)
    return paths

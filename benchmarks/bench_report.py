"""Run metadata and the JSON + markdown files of a MoE benchmark run (benchmarks/results/)."""

import datetime
import json
import os
import platform
import re
import subprocess
from pathlib import Path

import torch


def git_commit(repo: Path) -> str:
    """HEAD (+ "-dirty"); on the GPU machine, whose copy of the tree has no .git, the STATICMOE_COMMIT variable."""
    if os.environ.get("STATICMOE_COMMIT"):
        return os.environ["STATICMOE_COMMIT"]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "csrc", "model/kernels", "benchmarks"],
            cwd=repo, capture_output=True, text=True, check=True,
        )
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()}"


def run_metadata(repo: Path, device: torch.device, impl: str, args: dict) -> dict:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(repo),
        "device": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "ours": impl,
        "args": args,
    }


def _fmt(v, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def markdown(results: dict) -> str:
    m, c = results["meta"], results["ceilings"]
    lines = [
        f"# MoE layer benchmark — {m['device']}",
        "",
        f"date {m['date']} · commit `{m['commit']}` · torch {m['torch']} (CUDA {m['cuda']}) · ours: {m['ours']}",
        "",
        f"Ceilings measured in this run: dense GEMM {c['dense']['n']}³ = {c['dense']['tflops']:.1f} TFLOPS; "
        f"device copy = {c['copy']['gbps']:.0f} GB/s (read + write). Datasheet peak {c['datasheet_tflops']:.0f}.",
        "",
        "TFLOPS count 2·T·k·H·2I + 2·T·k·I·H. *BW %*: (weights of the experts hit + x + out) ÷ time, as % of the copy "
        "bandwidth. *× gmm* / *× loop*: their time ÷ ours (> 1: we are faster). *err*: ‖ours − gmm‖ / ‖gmm‖.",
        "",
        "| shape | T | routing | experts hit | ours ms | TFLOPS | % dense | % 989 | BW % | gmm ms | loop ms "
        "| × gmm | × loop | err |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["grid"]:
        if "skipped" in r:
            lines.append(f"| {r['shape']} | {r['T']} | {r['routing']} | skipped: {r['skipped']} |||||||||||")
            continue
        lines.append(
            f"| {r['shape']} | {r['T']} | {r['routing']} | {r['experts_hit']} | {r['ours_ms']:.4f} | "
            f"{r['tflops']:.1f} | {r['pct_dense']:.1f} | {r['pct_datasheet']:.1f} | {r['pct_copy_bw']:.1f} | "
            f"{_fmt(r['gmm_ms'], '.4f')} | {_fmt(r['loop_ms'], '.4f')} | {_fmt(r['x_gmm'], '.2f')} | "
            f"{_fmt(r['x_loop'], '.2f')} | {_fmt(r['rel_err'], '.1e')}{' **FLAG**' if r['flagged'] else ''} |"
        )
    measured = [r for r in results["grid"] if "skipped" not in r]
    if measured:
        slower_gmm = [r for r in measured if r["x_gmm"] is not None and r["x_gmm"] < 1]
        slower_loop = [r for r in measured if r["x_loop"] is not None and r["x_loop"] < 1]
        lines += [
            "",
            f"Points measured: {len(measured)}; slower than grouped_mm: {len(slower_gmm)}; slower than the loop: "
            f"{len(slower_loop)}; error flags (> 2e-2): {sum(r['flagged'] for r in measured)}.",
        ]
    lines += ["", "## Fixed cost (small T, whole op captured in a CUDA graph; µs per op)", "",
              "One-op graphs charge the graph's own launch to the op; ×16 columns capture 16 ops in one graph, as a "
              "model's decode graph holds one op per layer. H=I=128 makes the GEMMs negligible: that op is an upper "
              "bound on plan + combine.", ""]
    lines += ["| shape | T | ours µs | gmm µs | ours, H=I=128 µs | same, ×16 graph µs | plan only µs | plan, ×16 graph µs "
              "| combine, ×16 graph µs | plan + combine, ×16 graph µs |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["fixed_cost"]:
        plan16, combine16 = r.get("plan_layers_us"), r.get("combine_layers_us")
        both = None if plan16 is None or combine16 is None else plan16 + combine16
        lines.append(
            f"| {r['shape']} | {r['T']} | {_fmt(r['ours_us'], '.1f')} | {_fmt(r['gmm_us'], '.1f')} | "
            f"{_fmt(r['ours_tiny_us'], '.1f')} | {_fmt(r.get('ours_tiny_layers_us'), '.1f')} | "
            f"{_fmt(r['plan_us'], '.1f')} | {_fmt(plan16, '.1f')} | {_fmt(combine16, '.1f')} | {_fmt(both, '.1f')} |"
        )
    lines += ["", f"Mode: {results.get('fixed_cost_mode', '')}", ""]
    lines += ["## The paper's three scenarios (% of the 989 TFLOPS datasheet peak)", ""]
    lines += ["| shape | T | scenario | experts hit | max rows/expert | ours ms | ours % 989 | gmm ms | gmm % 989 |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in results["scenarios"]:
        lines.append(
            f"| {r['shape']} | {r['T']} | {r['scenario']} | {r['experts_hit']} | {r['max_rows']} | "
            f"{_fmt(r['ours_ms'], '.3f')} | {_fmt(r['ours_pct_datasheet'], '.1f')} | {_fmt(r['gmm_ms'], '.3f')} | "
            f"{_fmt(r['gmm_pct_datasheet'], '.1f')} |"
        )
    if results.get("errors"):
        lines += ["", "## Errors", ""] + [f"- {e}" for e in results["errors"]]
    return "\n".join(lines) + "\n"


def write_results(results: dict, out_dir: Path, quick: bool) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M")
    slug = re.sub(r"[^A-Za-z0-9]+", "-", results["meta"]["device"]).strip("-").lower()
    stem = out_dir / f"bench_moe_{stamp}_{slug}{'_quick' if quick else ''}"
    json_path, md_path = stem.with_suffix(".json"), stem.with_suffix(".md")
    json_path.write_text(json.dumps(results, indent=1) + "\n")
    md_path.write_text(markdown(results))
    return json_path, md_path

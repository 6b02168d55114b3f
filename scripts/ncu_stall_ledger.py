"""Where a kernel's warps stall, per SASS instruction: reads the CSV of `ncu -i REPORT --page source --csv
--print-source sass` and prints the instructions holding the most warp-stall samples (until `--cover` of all
samples), with each one's share, so a bottleneck is named from measured samples rather than guessed.

    ncu --kernel-name regex:NAME --launch-count 1 --section SourceCounters --section WarpStateStats -o rep CMD...
    ncu -i rep.ncu-rep --page source --csv --print-source sass > src.csv
    python3 scripts/ncu_stall_ledger.py src.csv
"""

import argparse
import csv
import sys


def number(text: str) -> float:
    try:
        return float(text.replace(",", "")) if text.strip() else 0.0
    except ValueError:
        return 0.0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("csv")
    p.add_argument("--cover", type=float, default=0.9, help="print rows until this share of samples is covered")
    p.add_argument("--max-rows", type=int, default=60)
    args = p.parse_args(argv)
    with open(args.csv, newline="") as f:
        lines = [line for line in f if line.startswith('"')]  # ncu prefixes its own log lines with ==PROF==
    rows = list(csv.reader(lines))
    if not rows:
        print("no CSV rows found", file=sys.stderr)
        return 1
    # The source page opens with "Kernel Name" rows; the table's header is the first row naming the sample column.
    start = next((i for i, r in enumerate(rows) if any(h.startswith("Warp Stall Sampling (All") for h in r)), 0)
    rows = rows[start:]
    header = rows[0]
    samples_col = next((i for i, h in enumerate(header) if h.startswith("Warp Stall Sampling (All")), None)
    source_col = next((i for i, h in enumerate(header) if h in ("Source", "Sass", "SASS")), None)
    address_col = next((i for i, h in enumerate(header) if h in ("Address", "#")), None)
    if samples_col is None or source_col is None:
        print("columns not found; header:", header, file=sys.stderr)
        return 1
    body = rows[1:]
    total = sum(number(r[samples_col]) for r in body if len(r) > samples_col)
    print(f"{len(body)} instructions, {total:.0f} stall samples; columns: {header}")
    ranked = sorted((r for r in body if len(r) > samples_col), key=lambda r: -number(r[samples_col]))
    covered = 0.0
    for r in ranked[: args.max_rows]:
        share = number(r[samples_col]) / total if total else 0.0
        covered += share
        where = r[address_col] if address_col is not None else ""
        extra = [f"{header[i]}={r[i]}" for i in range(len(header))
                 if i not in (samples_col, source_col, address_col) and "Stall" in header[i] and number(r[i]) > 0]
        print(f"{share:6.1%} {covered:6.1%}  {where:>6}  {r[source_col][:90]:90s}  {' '.join(extra)[:200]}")
        if covered >= args.cover:
            break
    return 0


if __name__ == "__main__":
    sys.exit(main())

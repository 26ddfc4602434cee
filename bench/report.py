"""Merge benchmark JSON files of one device run and print the Markdown tables.

    PYTHONPATH=. python -m bench.report bench/results/2026*_nvidia-h100*.json
    PYTHONPATH=. python -m bench.report $OUT/*.json --write $OUT     # device.sh: one merged JSON

Files that are not ajepa bench results (wrong schema) and earlier merged files are ignored.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

from bench import common

MERGED_KIND = "all"


def load(paths: list[Path]) -> list[dict]:
    payloads = []
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            print(f"[report] skipping {path}: {e}", file=sys.stderr)
            continue
        if not isinstance(data, dict) or data.get("schema") != common.SCHEMA or data.get("kind") == MERGED_KIND:
            continue
        payloads.append(data)
    return payloads


def plot_speedups(payload: dict, path: Path) -> Path | None:
    """Horizontal bars: the fused path's speedup over each peer, per case and op (log scale, 1x marked).
    Returns None when there is nothing to plot (no fused results, or no matplotlib)."""
    records = common.records_from_payload(payload)
    common.add_speedups(records)
    bars = [
        (f"{r.suite} {r.case.split(':')[0]} {r.op} vs {peer}", ratio)
        for r in records
        if r.impl == common.FUSED
        for peer, ratio in r.vs_peers.items()
    ]
    if not bars:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[report] matplotlib is not installed: no plot", file=sys.stderr)
        return None
    fig, ax = plt.subplots(figsize=(9, 0.28 * len(bars) + 1.2))
    labels, values = zip(*bars)
    ax.barh(range(len(bars)), values, color=["tab:green" if v >= 1 else "tab:red" for v in values])
    ax.set_yticks(range(len(bars)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", lw=0.8)
    ax.set_xlabel(f"{common.FUSED} speedup (peer time / {common.FUSED} time; > 1: {common.FUSED} faster)")
    ax.set_title(f"{payload.get('device', {}).get('name', '?')}, {payload.get('created_utc', '')}", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", type=Path, help="bench JSON files of one run (same device)")
    p.add_argument(
        "--write",
        type=Path,
        default=None,
        metavar="DIR",
        help="also write the merged JSON into DIR (named by date and device)",
    )
    p.add_argument(
        "--plot",
        type=Path,
        default=None,
        metavar="PNG",
        help="also draw the fused path's speedup over each peer (needs matplotlib)",
    )
    args = p.parse_args(argv)
    payloads = load(args.files)
    if not payloads:
        print("[report] no ajepa bench results among the files given", file=sys.stderr)
        return 1
    merged = common.merge_payloads(payloads, kind=MERGED_KIND)
    if args.write is not None:
        name = merged.get("device", {}).get("name", "unknown")
        path = common.write_json(merged, common.result_path(MERGED_KIND, name, datetime.now(timezone.utc), args.write))
        print(f"[report] merged {len(payloads)} files into {path}")
    if args.plot is not None:
        drawn = plot_speedups(merged, args.plot)
        print(f"[report] plot: {drawn}" if drawn else "[report] plot: nothing to draw (no fused results)")
    print()
    print(common.markdown_report(merged))  # the tables come last
    return 0


if __name__ == "__main__":
    sys.exit(main())

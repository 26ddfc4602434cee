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
    print()
    print(common.markdown_report(merged))
    return 0


if __name__ == "__main__":
    sys.exit(main())

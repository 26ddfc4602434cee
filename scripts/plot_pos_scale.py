"""Draw docs/learning.md's position-scale sweep: the speech probe of random-init and pretrained `tiny` encoders
against `model.pos_scale` (the amplitude of the encoders' fixed sin-cos positions), beside log-mel statistics.

    python scripts/plot_pos_scale.py                 # docs/learning_pos_scale.csv -> docs/learning_pos_scale.png
    python scripts/plot_pos_scale.py --csv sweep.csv --out fig.png

The CSV has one row per scored encoder (measured by `scripts/learn_eval.py` as docs/learning.md's tenth pass
describes) with the columns
    pos_scale, encoder, seed, probe
encoder: "random" (an untrained encoder) or "pretrained" (the `tiny` default trained 600 steps at that scale);
seed: its init or training seed; probe: linear-probe accuracy of its mean-pooled clip embeddings, split 0.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COLUMNS = ("pos_scale", "encoder", "seed", "probe")
ENCODERS = ("random", "pretrained")
LOGMEL = 0.940  # `ajepa probe --baseline mel` on the speech probe set, split 0 (`learn_eval.py --mel`: 0.927)


def read_sweep(path: Path) -> list[dict]:
    """The CSV's rows, typed; a missing file, column or malformed value is a one-line ValueError."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise ValueError(f"{path}: missing column(s) {', '.join(missing)}; expected {', '.join(COLUMNS)}")
            rows = []
            for line, r in enumerate(reader, start=2):
                if r["encoder"] not in ENCODERS:
                    raise ValueError(f"{path}, line {line}: encoder {r['encoder']!r}; choose {' or '.join(ENCODERS)}")
                try:
                    rows.append({"pos_scale": float(r["pos_scale"]), "encoder": r["encoder"], "seed": int(r["seed"]),
                                 "probe": float(r["probe"])})
                except (TypeError, ValueError):
                    raise ValueError(f"{path}, line {line}: pos_scale, seed and probe must be numbers") from None
    except OSError as exc:
        raise ValueError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def draw(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    # Random init: the best seed at each scale (issue #14's baseline); pretrained: the mean over its seeds.
    for enc, color, marker, pick, what in (("random", "0.45", "o", max, "the best seed"),
                                           ("pretrained", "tab:blue", "s", lambda v: sum(v) / len(v), "the mean")):
        pts = [r for r in rows if r["encoder"] == enc]
        if not pts:
            continue
        scales = sorted({r["pos_scale"] for r in pts})
        line = [pick([r["probe"] for r in pts if r["pos_scale"] == s]) for s in scales]
        ax.plot([r["pos_scale"] for r in pts], [r["probe"] for r in pts], marker, color=color, ms=5, alpha=0.8,
                ls="", label=f"{enc}: each seed")
        ax.plot(scales, line, "-", color=color, lw=1.2, label=f"{enc}: {what} at each scale")
    ax.axhline(LOGMEL, color="crimson", lw=1.2, ls="--", label="log-mel mean + std (no network)")
    ax.axvline(1.0, color="0.7", lw=0.8, ls=":")
    ax.set_xlabel("model.pos_scale (the encoders' sin-cos positions times this; 1 = the default)")
    ax.set_ylabel("speech probe accuracy (split 0)")
    ax.set_title("The margin over random init is set by the positions' amplitude", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--csv", type=Path, default=ROOT / "docs" / "learning_pos_scale.csv")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "learning_pos_scale.png")
    args = p.parse_args(argv)
    try:
        rows = read_sweep(args.csv)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    draw(rows, args.out)
    print(f"wrote {args.out} ({len(rows)} encoders)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

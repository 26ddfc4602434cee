"""Pictures (matplotlib, Agg backend, PNG): masks drawn over a spectrogram, and a run's training curves."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ajepa.config import Config

CURVES = (
    ("loss", "loss", True),
    ("lr", "learning rate", True),
    ("momentum", "EMA momentum", False),
    (("samples_per_s", "loader_clips_per_s"), "samples / s: the step's vs what the loader delivers", False),
    ("data_wait", "share of step time waiting for data", False),
    ("rankme", "RankMe of target features (effective rank)", False),
    ("feat_std", "target features: mean per-dimension std", False),
    ("pos_share", "target-feature variance share that is patch position", False),
)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _example_spec(cfg: Config, index: int, seed: int) -> tuple[np.ndarray, str]:
    from ajepa.data import SYNTH_CLASSES, SyntheticDataset

    ds = SyntheticDataset(index + 1, cfg.audio, seed)
    return ds.spectrogram(index)[0].numpy(), SYNTH_CLASSES[ds.labels[index]]


def _draw_masks(ax, spec: np.ndarray, cfg: Config, ctx: np.ndarray, targets: list[np.ndarray], title: str) -> None:
    from matplotlib.patches import Rectangle

    pt, pf = cfg.patch_shape
    gt, gf = cfg.grid
    ax.imshow(
        spec.T,
        origin="lower",
        aspect="auto",
        cmap="magma",
        interpolation="nearest",
        extent=(0, spec.shape[0], 0, spec.shape[1]),
    )
    hidden = np.ones(gt * gf, dtype=bool)
    hidden[ctx] = False  # patches the context encoder does not see: washed out
    shade = np.ones((gf, gt, 4))
    shade[..., 3] = hidden.reshape(gt, gf).T * 0.6
    ax.imshow(shade, origin="lower", aspect="auto", extent=(0, gt * pt, 0, gf * pf), interpolation="nearest")
    colors = ("#00e5ff", "#7CFC00", "#ffd400", "#ff4fd8", "#ff8c00", "#ffffff")
    for k, tgt in enumerate(targets):
        rows, cols = tgt // gf, tgt % gf
        r0, c0 = rows.min(), cols.min()
        ax.add_patch(
            Rectangle(
                (r0 * pt, c0 * pf),
                (rows.max() - r0 + 1) * pt,
                (cols.max() - c0 + 1) * pf,
                fill=False,
                edgecolor=colors[k % len(colors)],
                linewidth=2.0,
                label=f"target {k + 1}",
            )
        )
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("frame (10 ms)")
    ax.set_ylabel("mel bin")


def plot_masks(cfg: Config, out: str | Path, seed: int = 0, examples: int = 2) -> Path:
    """Context (unshaded) and target blocks (outlined) for multiblock and time-frequency masks over
    built-in-corpus spectrograms, and the curriculum's probability of time-frequency masks."""
    from ajepa.masks import curriculum_prob, sample_masks

    if examples < 1:
        raise ValueError(f"examples must be >= 1, got {examples}")
    _check_png(out)
    plt = _pyplot()
    rng = np.random.default_rng(seed)
    fig, axes = plt.subplots(examples + 1, 2, figsize=(11, 2.6 * (examples + 1)), squeeze=False)
    for row in range(examples):
        spec, kind = _example_spec(cfg, row * 3 + 2, seed)
        for col, use_tf in enumerate((False, True)):
            ctx, targets = sample_masks(rng, cfg.grid, cfg.masks, use_tf)
            name = "time-frequency" if use_tf else "multiblock"
            _draw_masks(
                axes[row][col],
                spec,
                cfg,
                ctx,
                targets,
                f"{name} masks, '{kind}' clip\n{ctx.size} of {cfg.num_patches} patches visible to the "
                f"context encoder, {len(targets)} target blocks",
            )
    ax = axes[examples][0]
    steps = np.linspace(0, cfg.train.steps, 400)
    ax.plot(steps, [curriculum_prob(int(s), cfg.train.steps, cfg.masks.curriculum_c0) for s in steps], color="C0")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("training step")
    ax.set_ylabel("P(time-frequency masks)")
    ax.set_title(f"curriculum (c0 = {cfg.masks.curriculum_c0}, masks.mode = {cfg.masks.mode})", fontsize=9)
    ax.grid(alpha=0.3)
    axes[examples][1].axis("off")
    axes[examples][1].text(
        0.0,
        0.5,
        "washed out: patches hidden from the context encoder\n"
        "outlined: target blocks whose latents the predictor\nmust predict "
        "(targets never overlap the context)",
        va="center",
        fontsize=9,
    )
    fig.tight_layout()
    return _save(fig, out)


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not Path(run_dir).is_dir():
        raise FileNotFoundError(f"run folder not found: {run_dir}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics file (is {run_dir} an `ajepa train --out` folder?)")
    rows, lines = [], path.read_text().splitlines()
    for lineno, line in enumerate(lines, 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                if lineno == len(lines):  # a half-written last line of a live run
                    break
                raise ValueError(f"{path}:{lineno}: not valid JSON") from None
    if not rows:
        raise ValueError(f"{path}: no metrics logged yet")
    return rows


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Loss, learning rate, EMA momentum, samples/s and the health statistics (RankMe, feature std,
    position share) against step, from RUN_DIR/metrics.jsonl."""
    out = Path(run_dir) / "training.png" if out is None else out
    _check_png(out)
    rows = read_metrics(run_dir)
    plt = _pyplot()
    rows_n = (len(CURVES) + 1) // 2
    fig, axes = plt.subplots(rows_n, 2, figsize=(10, 3.2 * rows_n))
    for ax in axes.flat[len(CURVES):]:
        ax.set_visible(False)
    for ax, (keys, label, log) in zip(axes.flat, CURVES):
        keys = keys if isinstance(keys, tuple) else (keys,)
        drawn = []
        for color, key in enumerate(keys):
            pts = [(r["step"], r[key]) for r in rows
                   if isinstance(r.get(key), (int, float)) and math.isfinite(r[key]) and "step" in r]
            if pts:
                x, y = zip(*pts)
                ax.plot(x, y, marker="." if len(pts) < 40 else None, color=f"C{color}", label=key)
                drawn.append(min(y))
        if drawn:
            if log and min(drawn) > 0:
                ax.set_yscale("log")
            if len(keys) > 1:
                ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, f"no '{keys[0]}' logged", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(
        f"{Path(run_dir).resolve().name}: {len(rows)} logged steps, last step {rows[-1].get('step')}", fontsize=11
    )
    fig.tight_layout()
    return _save(fig, out)


def _check_png(out) -> None:
    if Path(out).suffix.lower() != ".png":
        raise ValueError(f"{out}: pictures are written as PNG; give a path ending in .png")


def _save(fig, out) -> Path:
    import matplotlib.pyplot as plt

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out

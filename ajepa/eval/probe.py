"""Linear probe on frozen features: standardized features, L2-regularized logistic regression (torch,
full-batch L-BFGS), the L2 strength tuned on a held-out part of the training split (or, with `val_folds`, by
k-fold cross-validation over all of it).

Single-label data get softmax regression and accuracy; multi-label manifests (a label column listing
several labels, ';'-separated in CSV or a JSON list in JSONL) get one-vs-rest logistic regression and mAP.
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

L2_GRID = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)


# ---------------------------------------------------------------------------- splits and targets


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per-class shuffled split: each class with >= 2 clips gives at least one clip to each side."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test fraction must be in (0, 1), got {test_fraction}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = int(round(test_fraction * idx.size))
        if idx.size >= 2:
            n_test = min(max(n_test, 1), idx.size - 1)
        else:
            n_test = 0
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def random_split(n: int, test_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test fraction must be in (0, 1), got {test_fraction}")
    idx = np.random.default_rng(seed).permutation(n)
    n_test = min(max(int(round(test_fraction * n)), 1), n - 1)
    return np.sort(idx[n_test:]), np.sort(idx[:n_test])


def cv_folds(
    labels: np.ndarray, k: int, seed: int = 0, multilabel: bool = False
) -> list[tuple[np.ndarray, np.ndarray]]:
    """k (fit, validation) index pairs that together validate every clip once. Single-label: each class's clips,
    shuffled with `seed`, are dealt round-robin to the folds, so every fold holds each class in proportion.
    Multi-label: the clips are shuffled and dealt. A fold may come out empty only when k exceeds the clips."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    fold = np.empty(len(labels), dtype=np.int64)
    if multilabel:
        fold[rng.permutation(len(labels))] = np.arange(len(labels)) % k
    else:
        start = 0  # continue the deal where the last class stopped, so small classes do not all land in fold 0
        for c in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == c))
            fold[idx] = (start + np.arange(idx.size)) % k
            start = (start + idx.size) % k
    return [(np.flatnonzero(fold != f), np.flatnonzero(fold == f)) for f in range(k)]


def group_split(groups, test_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Hold out whole groups (speakers, recording sessions): shuffle the distinct groups with `seed` and move the
    first k to the test side, k the count whose clips come nearest `test_fraction` of all (at least one group on
    each side). No group is on both sides, so the probe is scored on speakers it never saw."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test fraction must be in (0, 1), got {test_fraction}")
    groups = np.asarray(groups)
    names = np.unique(groups)
    if names.size < 2:
        raise ValueError(f"a group split needs at least 2 groups, got {names.size}")
    order = np.random.default_rng(seed).permutation(names)
    sizes = np.array([(groups == g).sum() for g in order])
    n_test = int(np.argmin(np.abs(np.cumsum(sizes[:-1]) - test_fraction * groups.size))) + 1
    test = np.isin(groups, order[:n_test])
    return np.flatnonzero(~test), np.flatnonzero(test)


def _manifest_rows(path: Path) -> list[dict] | None:
    if path.suffix.lower() == ".csv":
        with path.open(newline="") as fh:
            return list(csv.DictReader(fh))
    if path.suffix.lower() == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return None


def manifest_column(path: str | Path, column: str) -> np.ndarray:
    """One column of a CSV/JSONL manifest, row by row (as `read_manifest` lists the clips), as strings.
    Raises ValueError naming the problem: not a manifest, no such column, or rows that leave it empty."""
    rows = _manifest_rows(Path(path))
    if rows is None:
        raise ValueError(f"--data {path}: --group-by needs a .csv or .jsonl manifest with a {column!r} column")
    values = [r.get(column) for r in rows]
    if rows and all(v is None for v in values):
        raise ValueError(f"--data {path}: no {column!r} column (columns: {', '.join(sorted(rows[0]))})")
    empty = [i for i, v in enumerate(values) if v in (None, "")]
    if empty:
        raise ValueError(f"--data {path}: {len(empty)} rows have no {column!r} (the first: row {empty[0] + 1})")
    return np.asarray([str(v) for v in values])


def _split_labels(value) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, list):
        return [str(v) for v in value]
    return [part.strip() for part in str(value).split(";") if part.strip()]


def manifest_label_sets(path: str | Path) -> list[list[str]] | None:
    """Label sets per manifest row when the manifest is multi-label, else None."""
    rows = _manifest_rows(Path(path))
    if rows is None:
        return None
    sets = [_split_labels(r.get("label")) for r in rows]
    return sets if any(len(s) > 1 for s in sets) else None


@dataclass
class Targets:
    """What the probe predicts: class ids [n] (single-label) or a multi-hot matrix [n, C]."""

    y: np.ndarray
    classes: tuple[str, ...]
    multilabel: bool

    def labelled(self) -> np.ndarray:
        return self.y.sum(1) > 0 if self.multilabel else self.y >= 0


def targets_for(dataset, data_path: str | None) -> Targets:
    sets = manifest_label_sets(data_path) if data_path is not None else None
    if sets is not None:
        classes = tuple(sorted({c for s in sets for c in s}))
        lookup = {c: i for i, c in enumerate(classes)}
        y = np.zeros((len(sets), len(classes)), dtype=np.float32)
        for r, s in enumerate(sets):
            y[r, [lookup[c] for c in s]] = 1.0
        return Targets(y, classes, True)
    return Targets(np.asarray(dataset.labels, dtype=np.int64), tuple(dataset.classes), False)


def logmel_features(dataset, audio) -> torch.Tensor:
    """The no-network baseline: per clip, the mean and the std over time of its log-mel spectrogram
    ([2 * num_mel_bins]), over the clip's own frames (no padding), within the window an encoder sees
    (the first audio.target_frames frames)."""
    feats = []
    for i in range(len(dataset)):
        fb = dataset.raw_fbank(i)[: audio.target_frames].double()
        feats.append(torch.cat([fb.mean(0), fb.std(0, unbiased=False)]))
    return torch.stack(feats).float()


# ---------------------------------------------------------------------------- the model


def require_two_classes(y: np.ndarray, multilabel: bool, classes=(), where: str = "the data") -> None:
    """A probe over one class scores 1.0 and means nothing: refuse it."""
    present = np.flatnonzero(y.sum(0) > 0) if multilabel else np.unique(y[y >= 0])
    if multilabel:
        varying = [c for c in present if (y[:, c] == 0).any()]
        if not varying:
            raise ValueError(f"{where}: every labelled clip has the same labels; a probe needs a label that "
                             "some clips have and others do not")
    elif len(present) < 2:
        names = [classes[int(c)] if int(c) < len(classes) else str(int(c)) for c in present]
        raise ValueError(f"{where}: only one class ({', '.join(names) or 'none'}); a probe needs at least 2")


def standardize(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """Scale every feature by the training split's mean and std."""
    mean = train.mean(0, keepdim=True)
    std = train.std(0, keepdim=True, unbiased=False).clamp_min(1e-6)
    return [(x - mean) / std for x in (train, *others)]


def _loss(logits, y, multilabel):
    if multilabel:
        return F.binary_cross_entropy_with_logits(logits, y)
    return F.cross_entropy(logits, y)


def fit_logreg(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float, multilabel: bool = False, max_iter: int = 100
) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimize mean cross-entropy + l2/2 * ||W||^2 with full-batch L-BFGS (float64). Returns (W, b)."""
    x = x.double()
    y = y.double() if multilabel else y.long()
    w = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b],
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-7,
        tolerance_change=1e-10,
    )

    def closure():
        opt.zero_grad()
        loss = _loss(x @ w + b, y, multilabel) + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


def average_precision(scores: np.ndarray, positives: np.ndarray) -> float:
    """Area under the precision-recall curve as the mean precision at each positive (sklearn's AP)."""
    order = np.argsort(-scores, kind="stable")
    hits = positives[order].astype(bool)
    if not hits.any():
        return float("nan")
    precision = np.cumsum(hits) / np.arange(1, hits.size + 1)
    return float(precision[hits].mean())


def mean_average_precision(scores: np.ndarray, y: np.ndarray) -> float:
    aps = [average_precision(scores[:, c], y[:, c]) for c in range(y.shape[1]) if y[:, c].any()]
    return float(np.mean(aps)) if aps else float("nan")


def _score(logits: torch.Tensor, y: np.ndarray, multilabel: bool) -> dict:
    if multilabel:
        return {"mAP": mean_average_precision(torch.sigmoid(logits).numpy(), y)}
    pred = logits.argmax(1).numpy()
    return {"accuracy": float((pred == y).mean())}


@dataclass
class ProbeResult:
    metrics: dict  # test metrics: accuracy (single-label) or mAP (multi-label)
    l2: float  # chosen L2 strength
    val_scores: dict  # L2 -> validation metric
    n_train: int
    n_test: int
    feature_dim: int
    multilabel: bool
    classes: list[str] = field(default_factory=list)
    val_folds: int = 1  # 1: L2 chosen on one held-out part of the training split; k: by k-fold cross-validation

    def to_dict(self) -> dict:
        return asdict(self)


def linear_probe(
    x_train,
    y_train,
    x_test,
    y_test,
    classes=(),
    multilabel: bool = False,
    l2_grid=L2_GRID,
    val_fraction: float = 0.25,
    seed: int = 0,
    val_folds: int = 1,
) -> ProbeResult:
    """Tune L2 on a held-out part of the training split (`val_fraction` of it, drawn with `seed`), or with
    `val_folds` = k > 1 by k-fold cross-validation over all of it (the mean validation score over the folds,
    weighted by their size); refit on the whole training split at the chosen L2, score the test split.

    One held-out part is what the probe has always done; on small sets its draw alone can flip the chosen L2
    and move the test accuracy by several points. Cross-validation costs k times the fits and is far steadier."""
    if isinstance(val_folds, bool) or not isinstance(val_folds, (int, np.integer)) or val_folds < 1:
        raise ValueError(f"val_folds must be a whole number >= 1, got {val_folds!r}")
    x_train, x_test = torch.as_tensor(x_train).double(), torch.as_tensor(x_test).double()
    y_train, y_test = np.asarray(y_train), np.asarray(y_test)
    if len(x_train) < 2 or len(x_test) < 1:
        raise ValueError(f"the probe needs at least 2 training and 1 test clips, got {len(x_train)} and {len(x_test)}")
    if val_folds > len(x_train):
        raise ValueError(f"val_folds {val_folds} needs at least {val_folds} training clips, got {len(x_train)}")
    require_two_classes(y_train, multilabel, classes, "the training split")
    num_classes = y_train.shape[1] if multilabel else int(max(y_train.max(), y_test.max())) + 1
    if val_folds > 1:
        folds = cv_folds(y_train, int(val_folds), seed, multilabel)
    elif multilabel:
        folds = [random_split(len(y_train), val_fraction, seed)]
    else:
        folds = [stratified_split(y_train, val_fraction, seed)]
    key = "mAP" if multilabel else "accuracy"
    per_fold: dict[float, list[tuple[float, int]]] = {l2: [] for l2 in l2_grid}
    for fit_idx, val_idx in folds:
        if not (len(val_idx) and len(fit_idx)):
            continue
        xf, xv = standardize(x_train[fit_idx], x_train[val_idx])
        yf = torch.as_tensor(y_train[fit_idx])
        for l2 in l2_grid:
            w, b = fit_logreg(xf, yf, num_classes, l2, multilabel)
            per_fold[l2].append((_score(xv @ w + b, y_train[val_idx], multilabel)[key], len(val_idx)))
    val_scores = {l2: _weighted_mean(v) for l2, v in per_fold.items() if v}
    # Ties (common on easy data) go to the strongest regularization.
    best = max(l2_grid, key=lambda l2: (val_scores.get(l2, 0.0), l2)) if val_scores else l2_grid[len(l2_grid) // 2]
    xt, xs = standardize(x_train, x_test)
    w, b = fit_logreg(xt, torch.as_tensor(y_train), num_classes, best, multilabel)
    return ProbeResult(
        metrics=_score(xs @ w + b, y_test, multilabel),
        l2=best,
        val_scores={str(k): v for k, v in val_scores.items()},
        n_train=len(x_train),
        n_test=len(x_test),
        feature_dim=int(x_train.shape[1]),
        multilabel=multilabel,
        classes=list(classes),
        val_folds=int(val_folds),
    )


def _weighted_mean(scores: list[tuple[float, int]]) -> float:
    """The validation score over folds, each weighted by its clips (one fold: its score, exactly)."""
    if len(scores) == 1:
        return scores[0][0]
    return sum(s * n for s, n in scores) / sum(n for _, n in scores)

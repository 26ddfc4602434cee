"""Representation health: cheap label-free statistics of encoder token features that flag collapse
and position-only features. Pure functions of a feature tensor; no model, no state.

    h = model.target_encoder.forward_dense(spec)     # [B, N, D]
    stats = health_stats(h)                          # {"rankme": ..., "feat_std": ..., "pos_share": ...}
"""

from __future__ import annotations

import math

import torch


def rankme(z: torch.Tensor, eps: float = 1e-7) -> float:
    """RankMe (Garrido et al., ICML 2023): the effective rank of the feature matrix z [n, D],
    exp of the Shannon entropy of its singular values normalized to sum 1:

        p_k = s_k / sum(s) + eps,   RankMe = exp(-sum_k p_k log p_k)

    1 for a rank-one matrix, min(n, D) when all singular values are equal. Uncentered, as in the paper.
    """
    if z.dim() != 2 or min(z.shape) == 0:
        raise ValueError(f"rankme: z must be a non-empty [n, D] matrix, got shape {tuple(z.shape)}")
    z = z.detach().double()
    # Singular values from the smaller Gram matrix: cheap for n >> D (many tokens, modest width).
    gram = z.T @ z if z.shape[0] >= z.shape[1] else z @ z.T
    s = torch.linalg.eigvalsh(gram).clamp_min(0).sqrt()
    total = s.sum()
    if not torch.isfinite(total) or total <= 0:
        return 0.0 if total == 0 else math.nan
    p = s / total + eps
    return float(torch.exp(-(p * p.log()).sum()))


def feature_std(z: torch.Tensor) -> float:
    """Mean over the D dimensions of each dimension's standard deviation over the n rows of z [n, D]."""
    if z.dim() != 2 or z.shape[0] < 2:
        raise ValueError(f"feature_std: z must be [n >= 2, D], got shape {tuple(z.shape)}")
    return float(z.detach().double().std(dim=0, unbiased=False).mean())


def position_share(h: torch.Tensor) -> float:
    """Share of the token features' variance explained by the patch position alone, in [0, 1].

    h [B, N, D]: B clips, N patch positions. With mu_n the mean over clips at position n, the
    variance splits into a within-position part (how much a position's feature changes from clip
    to clip) and a between-position part (how much the per-position means differ). This is the
    one-way ANOVA intraclass correlation, with positions as the classes:

        W = sum_{b,n,d} (h_bnd - mu_nd)^2 / (N (B - 1))           (unbiased within-position variance)
        A = sum_{n,d} (mu_nd - mu_d)^2 / N  -  W / B                (between-position variance, corrected
                                                                     for the noise of a B-clip mean)
        pos_share = max(A, 0) / (max(A, 0) + W)

    1 - pos_share is the share that varies with the clip. A pos_share near 1 means the features
    are (almost) the same for every clip: the encoder encodes where a patch is, not what it holds.
    """
    if h.dim() != 3 or h.shape[0] < 2 or h.shape[1] < 1:
        raise ValueError(f"position_share: h must be [B >= 2, N, D], got shape {tuple(h.shape)}")
    h = h.detach().double()
    B, N, _ = h.shape
    mu_n = h.mean(dim=0)  # [N, D]
    within = ((h - mu_n) ** 2).sum() / (N * (B - 1))
    between = ((mu_n - mu_n.mean(dim=0)) ** 2).sum() / N - within / B
    between = between.clamp_min(0)
    total = between + within
    return float(between / total) if total > 0 else 1.0


def health_stats(h: torch.Tensor, max_rows: int = 16384) -> dict[str, float]:
    """RankMe, mean per-dimension std (over all tokens) and pos_share of token features h [B, N, D].

    RankMe and the std use at most `max_rows` tokens (an evenly strided subset) to stay cheap."""
    if h.dim() != 3:
        raise ValueError(f"health_stats: h must be [B, N, D], got shape {tuple(h.shape)}")
    z = h.detach().float().reshape(-1, h.shape[-1])
    if z.shape[0] > max_rows:
        z = z[:: math.ceil(z.shape[0] / max_rows)]
    return {"rankme": rankme(z), "feat_std": feature_std(z), "pos_share": position_share(h)}


class CollapseWatch:
    """Decides, once per run, whether health statistics signal collapse.

    Signals: RankMe below `min_rankme`, or below `rank_drop` times its first observed value; the mean
    per-dimension std below `min_std`; pos_share above `max_pos_share`. `check` returns a message
    the first time any signal fires, and None before and ever after.
    """

    def __init__(self, min_rankme: float = 2.0, rank_drop: float = 0.25, min_std: float = 1e-3,
                 max_pos_share: float = 0.9):
        self.min_rankme, self.rank_drop = min_rankme, rank_drop
        self.min_std, self.max_pos_share = min_std, max_pos_share
        self.first_rankme: float | None = None
        self.warned = False

    def check(self, step: int, stats: dict[str, float]) -> str | None:
        r, s, p = stats["rankme"], stats["feat_std"], stats["pos_share"]
        if self.first_rankme is None:
            self.first_rankme = r
        if self.warned:
            return None
        why = []
        if r < self.min_rankme:
            why.append(f"RankMe {r:.2f} < {self.min_rankme:g}")
        elif r < self.rank_drop * self.first_rankme:
            why.append(f"RankMe {r:.2f} fell below {self.rank_drop:g} x its first value {self.first_rankme:.2f}")
        if s < self.min_std:
            why.append(f"mean per-dimension std {s:.2e} < {self.min_std:g}")
        if p > self.max_pos_share:
            why.append(f"{p:.0%} of the target-feature variance is patch position alone (> {self.max_pos_share:.0%})")
        if not why:
            return None
        self.warned = True
        return (f"step {step}: the target features look collapsed ({'; '.join(why)}). A low loss here does not "
                f"mean the encoder learned; see docs/learning.md")

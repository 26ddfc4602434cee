"""SIGReg (LeJEPA, Balestriero and LeCun 2025): push embeddings toward an isotropic standard Gaussian
by testing random 1-D projections of them against N(0, 1) with the Epps-Pulley statistic.

For unit directions a_1..a_M and projections u_j = <z_j, a> of the n embeddings, the empirical
characteristic function is phi_n(t) = mean_j exp(i t u_j); N(0, 1)'s is phi(t) = exp(-t^2 / 2). The
Epps-Pulley statistic weights their squared distance by w(t) = exp(-t^2 / 2):

    EP(a) = integral |phi_n(t) - phi(t)|^2 w(t) dt
          = integral [(mean_j cos(t u_j) - phi(t))^2 + (mean_j sin(t u_j))^2] w(t) dt,

integrated here with the trapezoid rule on [-t_max, t_max]. SIGReg is the mean of EP over the M
directions. It is ~0 (of order 1/n) for standard Gaussian samples and large when the embeddings
collapse to a point or a low-dimensional subspace, and it is differentiable in z.
"""

from __future__ import annotations

import torch


def epps_pulley(u: torch.Tensor, t_max: float = 4.0, knots: int = 33) -> torch.Tensor:
    """Epps-Pulley statistic of each column of u [n, M] against N(0, 1): [M]."""
    if u.dim() != 2 or u.shape[0] < 1:
        raise ValueError(f"epps_pulley: u must be [n >= 1, M], got shape {tuple(u.shape)}")
    t = torch.linspace(-t_max, t_max, knots, device=u.device, dtype=u.dtype)  # [K]
    tu = u.unsqueeze(-1) * t  # [n, M, K]
    re = torch.cos(tu).mean(0)  # [M, K]
    im = torch.sin(tu).mean(0)
    gauss = torch.exp(-0.5 * t * t)
    integrand = ((re - gauss) ** 2 + im**2) * gauss
    return torch.trapezoid(integrand, t, dim=-1)


def sigreg(z: torch.Tensor, projections: int = 64, generator: torch.Generator | None = None,
           t_max: float = 4.0, knots: int = 33) -> torch.Tensor:
    """Mean Epps-Pulley statistic of z [n, D] along `projections` random unit directions (scalar)."""
    if z.dim() != 2 or z.shape[0] < 2:
        raise ValueError(f"sigreg: z must be [n >= 2, D], got shape {tuple(z.shape)}")
    if projections < 1:
        raise ValueError(f"sigreg: projections must be >= 1, got {projections}")
    a = torch.randn(z.shape[1], projections, device=z.device, dtype=torch.float32, generator=generator)
    a = a / a.norm(dim=0, keepdim=True)
    with torch.autocast(z.device.type, enabled=False):  # float32 even inside a bf16 autocast region
        return epps_pulley(z.float() @ a, t_max, knots).mean()

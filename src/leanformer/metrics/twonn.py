"""TwoNN intrinsic dimension (Facco et al. 2017; methods.md §1.3).

Points are centred and scaled by the mean row norm (as in the paper; the ratios μ are invariant to
it). μ = r2/r1 from each point's two nearest neighbours (one vectorised distance computation, in
row blocks so memory stays O(block·n)); duplicates (r1 < eps or μ ≤ 1 + eps) are dropped — eps is
relative to the mean norm, and must sit above the ~1e-8 round-off of the Gram-form distances so that
exact duplicates (e.g. every sequence's [CLS] embedding) do not pass as huge ratios. The
estimator fits −log(1 − k/N) = d·log μ through the origin on the `keep` smallest fraction of μ:
keep=0.9 is scikit-dimension's TwoNN (discard the largest 10 %, the default here); keep=0.2 is
the "Shape of Learning" reference (smallest N//5).
"""
from __future__ import annotations

import torch


def two_nn_ratios(X: torch.Tensor, eps: float = 1e-6, block: int = 1024) -> torch.Tensor:
    X = X.to(torch.float64)
    X = X - X.mean(dim=0, keepdim=True)
    X = X / X.norm(dim=1).mean().clamp_min(torch.finfo(torch.float64).tiny)
    sq = X.pow(2).sum(dim=1)
    r = torch.empty(X.shape[0], 2, dtype=torch.float64)
    for start in range(0, X.shape[0], block):
        xb = X[start:start + block]
        d2 = (sq[start:start + block, None] + sq[None, :] - 2 * xb @ X.T).clamp_min(0)
        d2[torch.arange(len(xb)), torch.arange(start, start + len(xb))] = float("inf")  # not its own neighbour
        r[start:start + len(xb)] = d2.topk(2, dim=1, largest=False).values.sqrt()
    r1, r2 = r[:, 0], r[:, 1]
    valid = r1 > eps
    mu = r2[valid] / r1[valid]
    return mu[mu > 1 + eps]


def intrinsic_dimension(X: torch.Tensor, keep: float = 0.9, eps: float = 1e-6) -> float:
    """TwoNN estimate for the (n, d) points X (see module docstring for `keep`)."""
    if not 0 < keep <= 1:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    mu = torch.sort(two_nn_ratios(X, eps=eps)).values
    n = mu.numel()
    n_keep = int(n * keep) if keep < 1 else n - 1  # F = 1 at the last point: log(0) undefined
    if n_keep < 2:
        return float("nan")
    x = mu[:n_keep].log()
    y = -torch.log1p(-torch.arange(1, n_keep + 1, dtype=torch.float64) / n)
    return float((x * y).sum() / (x * x).sum())

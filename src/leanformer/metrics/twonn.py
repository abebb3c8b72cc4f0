"""TwoNN intrinsic dimension (Facco, d'Errico, Rodriguez, Laio, "Estimating the intrinsic dimension of datasets by a minimal neighborhood information", Sci. Rep. 2017).

Points are centred and scaled by the mean row norm (as in the paper; the ratios μ are invariant to
it). μ = r2/r1 from each point's two nearest neighbours (vectorised distances, in
row blocks so memory stays O(block·n)); duplicates (r1 < eps or μ ≤ 1 + eps, eps relative to the
mean norm) are dropped — e.g. every sequence's [CLS] embedding, identical at h_0. The
estimator fits −log(1 − k/N) = d·log μ through the origin on the `keep` smallest fraction of μ:
keep=0.9 is scikit-dimension's TwoNN (discard the largest 10 %, the default here); keep=0.2 is
the "Shape of Learning" reference (smallest N//5).
"""
from __future__ import annotations

import torch


def two_nn_ratios(X: torch.Tensor, eps: float = 1e-7, block: int = 1024, candidates: int = 32) -> torch.Tensor:
    X = X.to(torch.float64)
    X = X - X.mean(dim=0, keepdim=True)
    X = X / X.norm(dim=1).mean().clamp_min(torch.finfo(torch.float64).tiny)
    # Candidates from float32 Gram-form distances (fast), then exact float64 differences for those
    # few: the Gram form alone loses near neighbours (and exact duplicates) to round-off. In
    # hundreds of dimensions distances concentrate, so float32 can reorder the nearest few: 8
    # candidates missed true neighbours on MiniLM states, 32 matched the exact loop to 1e-14.
    X32 = X.float()
    sq = X32.pow(2).sum(dim=1)
    r = torch.empty(X.shape[0], 2, dtype=torch.float64)
    k = min(candidates, X.shape[0] - 1)
    for start in range(0, X.shape[0], block):
        rows = torch.arange(start, min(start + block, X.shape[0]))
        d2 = sq[rows, None] + sq[None, :] - 2 * X32[rows] @ X32.T
        d2[torch.arange(len(rows)), rows] = float("inf")  # not its own neighbour
        idx = d2.topk(k, dim=1, largest=False).indices
        exact = (X[idx] - X[rows, None, :]).norm(dim=2)
        r[rows] = exact.topk(2, dim=1, largest=False).values
    r1, r2 = r[:, 0], r[:, 1]
    valid = r1 > eps
    mu = r2[valid] / r1[valid]
    return mu[mu > 1 + eps]


def intrinsic_dimension(X: torch.Tensor, keep: float = 0.9, eps: float = 1e-7) -> float:
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

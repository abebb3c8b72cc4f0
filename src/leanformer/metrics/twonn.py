"""TwoNN intrinsic dimension (Facco, d'Errico, Rodriguez, Laio, "Estimating the intrinsic dimension of datasets by a minimal neighborhood information", Sci. Rep. 2017).

Points are centred and scaled by the mean row norm (as in the paper; the ratios μ are invariant to
it). μ = r2/r1 from each point's two nearest neighbours; duplicates (r1 < eps or μ ≤ 1 + eps, eps
relative to the mean norm) are dropped — e.g. every sequence's [CLS] embedding, identical at h_0.
The estimator fits −log(1 − k/N) = d·log μ through the origin on the smallest part of the sorted μ;
which part is the one choice that differs between the published estimators (ID_ESTIMATORS).
"""
from __future__ import annotations

import torch

# Fraction of the smallest μ kept in the fit, by estimator name.
#   twonn-skdim: discard the largest 10 % of μ — Facco et al. 2017's recommendation, and the
#                default of scikit-dimension's skdim.id.TwoNN (discard_fraction=0.1);
#   twonn-paper: keep the smallest N//5 — the estimator of Razzhigaev et al., "The Shape of
#                Learning" (EACL 2024 Findings) and "Your Transformer is Secretly Linear" (ACL 2024),
#                whose per-layer intrinsic-dimension curves are drawn with it.
ID_ESTIMATORS = {"twonn-skdim": 0.9, "twonn-paper": 0.2}


def two_nn_ratios(X: torch.Tensor, eps: float = 1e-7, block: int = 256, candidates: int = 8) -> torch.Tensor:
    """μ = r2/r1 for every point of X (n, d) that is not a duplicate, exactly as with float64
    distances to every other point.

    Candidates come from float32 Gram-form distances (one matrix product per row block), then the
    few candidates' exact float64 distances pick r1, r2. The float32 form is off by at most
    `slack` (a bound on its round-off), so when the last candidate is more than 2·slack beyond the
    second, no point outside the candidates can be nearer; rows where that does not hold (near-ties)
    get exact distances to every point, unless a duplicate already drops them."""
    X = X.to(torch.float64)
    X = X - X.mean(dim=0, keepdim=True)
    X = X / X.norm(dim=1).mean().clamp_min(torch.finfo(torch.float64).tiny)
    n, d = X.shape
    X32 = X.float()
    sq = X32.pow(2).sum(dim=1)
    # |fl32(‖x‖² + ‖y‖² − 2x·y) − exact| ≤ (d + 2)·u·(‖x‖² + ‖y‖²) + O(u²) (Higham, Accuracy and
    # Stability of Numerical Algorithms, §3.1), u = 2⁻²⁴; doubled for safety.
    slack = 2 * (d + 2) * torch.finfo(torch.float32).eps * (sq + sq.max())
    r = torch.empty(n, 2, dtype=torch.float64)
    k = min(candidates, n - 1)
    for start in range(0, n, block):  # row blocks: memory O(block·n), temporaries reused
        rows = torch.arange(start, min(start + block, n))
        d2 = torch.addmm(sq[None, :], X32[rows], X32.T, alpha=-2).add_(sq[rows, None])
        d2[torch.arange(len(rows)), rows] = float("inf")  # not its own neighbour
        near, idx = d2.topk(k, dim=1, largest=False)
        exact = (X[idx] - X[rows, None, :]).norm(dim=2)
        r[rows] = exact.topk(2, dim=1, largest=False).values
        if k < n - 1:  # a point whose candidate r1 is already < eps is dropped whatever lies beyond
            unsure = ((near[:, -1] - near[:, 1] <= 2 * slack[rows]) & (r[rows, 0] >= eps)).nonzero().flatten()
            for j in unsure.tolist():
                row = int(rows[j])
                full = (X - X[row]).norm(dim=1)
                full[row] = float("inf")
                r[row] = full.topk(2, largest=False).values
    r1, r2 = r[:, 0], r[:, 1]
    valid = r1 > eps
    mu = r2[valid] / r1[valid]
    return mu[mu > 1 + eps]


def intrinsic_dimension(X: torch.Tensor, keep: float = 0.9, eps: float = 1e-7) -> float:
    """TwoNN estimate for the (n, d) points X, fitted on the smallest `keep` fraction of μ
    (0.9 = twonn-skdim, 0.2 = twonn-paper; see ID_ESTIMATORS)."""
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

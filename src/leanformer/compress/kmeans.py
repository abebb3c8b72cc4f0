"""Deterministic Lloyd k-means with k-means++ seeding on a subsample (Kashin's reference codebook)."""
from __future__ import annotations

import torch


def kmeans(points: torch.Tensor, k: int, iters: int = 30, sample: int = 200_000, seed: int = 0,
           chunk: int = 65_536) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic Lloyd k-means (k-means++ init on a subsample). Returns (centroids (k, d), labels (n,))."""
    g = torch.Generator().manual_seed(seed)
    n = points.shape[0]
    sub = points[torch.randperm(n, generator=g)[:sample]] if n > sample else points
    # k-means++ seeding on at most 20k points keeps init cheap and deterministic
    seed_pts = sub[:20_000]
    cent = seed_pts[torch.randint(len(seed_pts), (1,), generator=g)]
    d2 = ((seed_pts - cent) ** 2).sum(1)
    for _ in range(1, k):
        probs = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1 / len(d2))
        c = seed_pts[torch.multinomial(probs, 1, generator=g)]
        cent = torch.cat([cent, c])
        d2 = torch.minimum(d2, ((seed_pts - c) ** 2).sum(1))
    for _ in range(iters):
        lab = _assign(sub, cent, chunk)
        sums = torch.zeros_like(cent).index_add_(0, lab, sub)
        counts = torch.bincount(lab, minlength=k).to(sub.dtype)
        new = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], cent)
        if torch.allclose(new, cent, atol=1e-7, rtol=0):
            cent = new
            break
        cent = new
    return cent, _assign(points, cent, chunk)


def _assign(points: torch.Tensor, cent: torch.Tensor, chunk: int) -> torch.Tensor:
    c2 = (cent ** 2).sum(1)
    out = torch.empty(points.shape[0], dtype=torch.int64)
    for i in range(0, points.shape[0], chunk):
        p = points[i:i + chunk]
        out[i:i + chunk] = (c2[None, :] - 2 * p @ cent.T).argmin(1)
    return out

"""Linearity score (Razzhigaev et al., "Your Transformer is Secretly Linear", ACL 2024).

linearity(X, Y) = 1 − min_A ‖X̃A − Ỹ‖²_F with X̃, Ỹ column-centred and scaled to unit Frobenius
norm, A any d×d matrix (ordinary least squares, not Procrustes). Solved in float64 with a
guarded pseudo-inverse, since adjacent hidden states are often close to rank-deficient.
"""
from __future__ import annotations

import torch

# Directions whose energy is below this fraction of the largest are treated as null (the guard the
# reference's unguarded 1/S lacks). Relative to singular values; squared for Gram eigenvalues.
RCOND = 1e-7


def _normalise(M: torch.Tensor) -> torch.Tensor:
    M = M.to(torch.float64)
    M = M - M.mean(dim=0, keepdim=True)
    norm = torch.linalg.matrix_norm(M)
    return M / norm if norm > 0 else M


def linearity(X: torch.Tensor, Y: torch.Tensor) -> float:
    """Linearity of the map X → Y, both (n, d) (n tokens). 1 = exactly linear, ≈0 = unrelated."""
    if X.ndim != 2 or Y.ndim != 2 or X.shape[0] != Y.shape[0]:
        raise ValueError(f"expected X (n, d) and Y (n, d') with the same n, got {tuple(X.shape)} and {tuple(Y.shape)}")
    Xn, Yn = _normalise(X), _normalise(Y)
    if float(torch.linalg.matrix_norm(Yn)) == 0.0:
        return 1.0  # a constant target is reproduced exactly by any A
    A = torch.linalg.lstsq(Xn, Yn, rcond=RCOND, driver="gelsd").solution
    residual = torch.linalg.matrix_norm(Xn @ A - Yn) ** 2
    return float(1.0 - residual)


def linearity_wo_residual(X: torch.Tensor, Y: torch.Tensor) -> float:
    """Linearity between a block's input X and its own contribution Y − X (residual removed)."""
    return linearity(X, Y - X)


def linearity_from_moments(Cxx: torch.Tensor, Cxy: torch.Tensor, Cyy_trace: float) -> float:
    """The same score from centred second moments (streaming path):
    1 − min‖X̃A − Ỹ‖² = tr(Cxyᵀ Cxx⁺ Cxy) / tr(Cyy), the Frobenius scalings cancelling out."""
    if Cyy_trace <= 0:
        return 1.0
    evals, evecs = torch.linalg.eigh(Cxx)
    keep = evals > evals.max().clamp_min(0) * RCOND**2
    P = evecs[:, keep].T @ Cxy  # Cxy in the eigenbasis of Cxx, null directions dropped
    explained = (P.pow(2).sum(dim=1) / evals[keep]).sum()
    return float(explained / Cyy_trace)

"""Anisotropy (Razzhigaev et al., "The Shape of Learning: Anisotropy and Intrinsic Dimensions in Transformer-Based Models", EACL 2024 Findings): σ₁² / Σσᵢ² of the centred (n, d) matrix,
i.e. the share of variance along the top principal direction. 1 for rank-one data, ≈1/d for isotropic."""
from __future__ import annotations

import torch


def anisotropy(E: torch.Tensor) -> float:
    E = E.to(torch.float64)
    E = E - E.mean(dim=0, keepdim=True)
    return anisotropy_from_covariance(E.T @ E)


def anisotropy_from_covariance(C: torch.Tensor) -> float:
    """Same score from the centred scatter matrix EᵀE (streaming path): λ_max / trace."""
    trace = torch.trace(C)
    if trace <= 0:
        return float("nan")  # all points identical: no direction carries variance
    return float(torch.linalg.eigvalsh(C)[-1] / trace)

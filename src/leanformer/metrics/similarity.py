"""Per-layer signals used to rank blocks for removal (block influence: Men et al., ShortGPT, 2024; angular distance: Gromov et al., "The Unreasonable Ineffectiveness of the Deeper Layers", 2024)."""
from __future__ import annotations

import torch


def block_influence(X: torch.Tensor, Y: torch.Tensor) -> float:
    """ShortGPT: 1 − mean over tokens of cos(h_i[t], h_{i+1}[t]). Lowest = most removable."""
    cos = torch.nn.functional.cosine_similarity(X.to(torch.float64), Y.to(torch.float64), dim=1)
    return float(1.0 - cos.mean())


def angular_distance(x_last: torch.Tensor, y_last: torch.Tensor) -> float:
    """Gromov et al.: arccos(cos(h_ℓ[T], h_ℓ+n[T]))/π on each sequence's last token, averaged.
    Inputs are (n_sequences, d): the last valid token of each sequence."""
    cos = torch.nn.functional.cosine_similarity(x_last.to(torch.float64), y_last.to(torch.float64), dim=1)
    return float((torch.arccos(cos.clamp(-1, 1)) / torch.pi).mean())


def mlp_sparsity(activations: torch.Tensor, eps: float = 1e-2) -> float:
    """Fraction of MLP intermediate activations with |a| ≤ eps (exact zeros for ReLU;
    near-zeros for GELU/SiLU, whose negative tail is small but not 0)."""
    return float((activations.abs() <= eps).to(torch.float64).mean())

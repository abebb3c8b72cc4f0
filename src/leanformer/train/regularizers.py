"""Training-time regularisers on the residual stream.

CosineRegularizer (Razzhigaev et al., "Your Transformer is Secretly Linear", ACL 2024,
arXiv:2405.12250, the regularisation of their pretraining experiments): λ Σ_i (1 − cos(h_i, h_{i−1}))
over the block transitions i = 1…L, each term the mean over valid (non-padding) tokens. The paper uses
it in pretraining with λ = 0.5 to lower layer linearity. The states are the residual stream captured
with block hooks (h_0 = input of block 0, h_i = output of block i−1), i.e. before any final norm,
the same states the linearity metric is measured on.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import LeanformerError


@dataclass
class CosineRegularizer:
    lam: float = 0.5

    def __post_init__(self):
        if self.lam < 0:
            raise LeanformerError(f"regulariser weight λ must be ≥ 0, got {self.lam}")

    def per_layer(self, states: list[torch.Tensor], attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(L,) tensor: mean over valid tokens of 1 − cos(h_i, h_{i−1}) for i = 1…L (unweighted)."""
        if any(s is None for s in states):
            raise LeanformerError("residual states missing: run the model's forward inside residual_stream(model)")
        terms = []
        for prev, cur in zip(states[:-1], states[1:]):
            d = 1 - torch.nn.functional.cosine_similarity(cur.float(), prev.float(), dim=-1)  # (batch, seq)
            if attention_mask is not None:
                m = attention_mask.to(d.dtype)
                terms.append((d * m).sum() / m.sum().clamp_min(1))
            else:
                terms.append(d.mean())
        return torch.stack(terms)

    def __call__(self, states: list[torch.Tensor], attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.lam * self.per_layer(states, attention_mask).sum()

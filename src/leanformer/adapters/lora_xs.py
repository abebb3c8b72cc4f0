"""LoRA-XS (Bałazy et al. 2024): frozen factors from a truncated SVD of W, a trainable r×r core.

W ≈ U_r Σ_r V_rᵀ; B = U_r (out×r) and A = Σ_r V_rᵀ (r×in) are frozen buffers, R (r×r) trains, and
ΔW = (α/r)·B R A. Trainable parameters per layer: r², whatever the width. Since ΔW = (α/r)·(B R) A it
is exactly a rank-r LoRA, which is how it exports to peft.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import LowRankConfig, AdapterModule, register
from .lora import _dropout


def truncated_svd(w: torch.Tensor, rank: int, randomized: bool | None = None, niter: int = 6):
    """(U_r, S_r, V_r) of w in fp32. Randomised (Halko et al.) for big matrices, where a full SVD
    would dominate the set-up time; exact otherwise."""
    w = w.detach().float()
    if randomized is None:
        randomized = min(w.shape) > 2048 and rank < min(w.shape) // 4
    if randomized:
        gen_state = torch.random.get_rng_state()  # keep the caller's RNG stream untouched
        torch.manual_seed(0)
        u, s, v = torch.svd_lowrank(w, q=min(rank + 16, min(w.shape)), niter=niter)
        torch.random.set_rng_state(gen_state)
        return u[:, :rank], s[:rank], v[:, :rank]
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    return u[:, :rank], s[:rank], vh[:rank].T


class LoRAXSModule(AdapterModule):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float, init_std: float,
                 randomized: bool | None):
        super().__init__()
        # a quantized base has no stored dense weight: take the SVD of the weight it computes with
        weight = base.weight if isinstance(getattr(base, "weight", None), torch.Tensor) else base.dequantize()
        u, s, v = truncated_svd(weight, rank, randomized)
        dtype = weight.dtype
        self.register_buffer("xs_B", u.contiguous().to(dtype))                    # out × r, frozen
        self.register_buffer("xs_A", (s[:, None] * v.T).contiguous().to(dtype))   # r × in, frozen
        self.xs_R = nn.Parameter(torch.randn(rank, rank, dtype=dtype) * init_std)
        self.scaling = alpha / rank
        self.drop = _dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(self.drop(x), self.xs_A)
        return F.linear(F.linear(h, self.xs_R), self.xs_B) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        return (self.xs_B @ self.xs_R @ self.xs_A) * self.scaling

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self.xs_A.detach(), (self.xs_B @ self.xs_R).detach(), self.xs_R.shape[0]


@register
@dataclass
class LoRAXS(LowRankConfig):
    """Trainable r×r core between frozen SVD factors of each targeted weight."""
    init_std: float = 1e-5
    randomized_svd: bool | None = None  # None: randomised only for matrices wider than 2048
    method = "lora_xs"

    def build(self, base: nn.Linear, name: str) -> LoRAXSModule:
        self.check_rank(base, name)
        return LoRAXSModule(base, self.rank, self.alpha, self.dropout, self.init_std, self.randomized_svd)

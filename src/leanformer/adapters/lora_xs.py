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

from ..errors import LeanformerError
from ..targets import dense_weight
from .base import LowRankConfig, AdapterModule, register
from .lora import _dropout
from .recipe import Recipe


def truncated_svd(w: torch.Tensor, rank: int, randomized: bool | None = None, niter: int = 6):
    """(U_r, S_r, V_r) of w in fp32, each singular pair's sign fixed so that the largest-magnitude
    entry of each column of U_r is positive (scikit-learn's `svd_flip` convention): the factors are
    then a function of w alone, so a saved adapter can rebuild them from the base instead of storing
    them. Randomised (Halko et al.) for big matrices, where a full SVD would dominate the set-up
    time; exact otherwise."""
    w = w.detach().float()
    if randomized is None:
        randomized = min(w.shape) > 2048 and rank < min(w.shape) // 4
    if randomized:
        gen_state = torch.random.get_rng_state()  # keep the caller's RNG stream untouched
        torch.manual_seed(0)
        u, s, v = torch.svd_lowrank(w, q=min(rank + 16, min(w.shape)), niter=niter)
        torch.random.set_rng_state(gen_state)
        u, s, v = u[:, :rank], s[:rank], v[:, :rank]
    else:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        u, s, v = u[:, :rank], s[:rank], vh[:rank].T
    signs = torch.sign(u.gather(0, u.abs().argmax(0, keepdim=True)))
    signs[signs == 0] = 1
    return u * signs, s, v * signs


CHECK_TOLERANCE = 1e-4  # relative to the Cauchy–Schwarz bound; fp32 SVDs on other BLAS differ by ~1e-6


def factor_checksum(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Four numbers that identify the frozen factors B (out×r) and A (r×in): bilinear forms uᵀ B w
    and wᵀ A v with fixed pseudo-random probe vectors (a CPU generator seeded 0, the same on every
    machine). A flipped sign, a rotated or a different subspace moves them by far more than
    CHECK_TOLERANCE; float noise between machines does not."""
    out_f, r = b.shape
    in_f = a.shape[1]
    g = torch.Generator().manual_seed(0)
    probes = [torch.randn(n, generator=g, dtype=torch.float64) for n in (out_f, r, out_f, r, r, in_f, r, in_f)]
    b64, a64 = b.detach().double().cpu(), a.detach().double().cpu()
    u1, w1, u2, w2, w3, v1, w4, v2 = probes
    return torch.stack([u1 @ b64 @ w1, u2 @ b64 @ w2, w3 @ a64 @ v1, w4 @ a64 @ v2]).float()


def _checksum_bounds(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    out_f, r = b.shape
    in_f = a.shape[1]
    nb, na = float(b.double().norm()), float(a.double().norm())
    return torch.tensor([nb * (out_f * r) ** 0.5, nb * (out_f * r) ** 0.5, na * (in_f * r) ** 0.5,
                         na * (in_f * r) ** 0.5])


class LoRAXSModule(AdapterModule):
    # Frozen factors rebuilt from the base weight at load (canonical SVD), so a saved adapter holds only
    # the r×r core and `xs_check`; lf.save leaves these out of adapter-only (referenced-base) saves.
    rebuilt_buffers = ("xs_B", "xs_A")

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float, init_std: float,
                 randomized: bool | None):
        super().__init__()
        weight = dense_weight(base)  # (out, in): a Conv1D's transposed storage, a quantized layer's rebuilt weight
        u, s, v = truncated_svd(weight, rank, randomized)
        dtype = weight.dtype
        self.register_buffer("xs_B", u.contiguous().to(dtype))                    # out × r, frozen
        self.register_buffer("xs_A", (s[:, None] * v.T).contiguous().to(dtype))   # r × in, frozen
        self.register_buffer("xs_check", factor_checksum(self.xs_B, self.xs_A))   # saved: what the factors were
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

    def check_rebuilt(self, where: str = "") -> None:
        """After a load: the factors rebuilt from this base must be the ones the core was trained
        between (the saved xs_check); otherwise the core means nothing here."""
        got = factor_checksum(self.xs_B, self.xs_A)
        bound = _checksum_bounds(self.xs_B, self.xs_A)
        worst = float(((got - self.xs_check.float().cpu()).abs() / bound).max())
        if not worst <= CHECK_TOLERANCE:
            raise LeanformerError(
                f"{where or 'LoRA-XS adapter'}: the SVD factors rebuilt from this base weight do not match the "
                f"checksum saved with the adapter (relative difference {worst:.2e} > {CHECK_TOLERANCE:g}): the "
                "base is not the one the adapter was trained on (another checkpoint, dtype or an edited / merged "
                "weight). Load the adapter onto its original base model")


@register
@dataclass
class LoRAXS(LowRankConfig):
    """Trainable r×r core between frozen SVD factors of each targeted weight. `init_std`: R ~ N(0,
    init_std²), 1e-5 as the authors (utils/initialization_utils.py, init_module_weights)."""
    init_std: float = 1e-5
    randomized_svd: bool | None = None  # None: randomised only for matrices wider than 2048
    method = "lora_xs"
    # MohammadrezaBanaei/LoRA-XS: main_glue.py targets query, value, attention.output.dense and output.dense
    # (roles q, v, o, mlp_out), lora_alpha 16, AdamW (torch default weight decay 0.01) with a separate
    # classifier group, linear schedule with 6 % warm-up; scripts/run_glue.py sweeps lr ∈ {1e-4, 5e-4,
    # 1e-3} for R and {5e-4, 1e-3, 5e-3} for the head over 10 epochs of RoBERTa-large (~10⁴ steps).
    # Everything but R's learning rate is theirs (head: the top of their sweep). Each of R's r² entries
    # moves by about lr per Adam step, and with ~50× fewer entries than a LoRA of the same rank the
    # update stays ≈ 0 over the few hundred steps of a small task at their rates. R's rate was chosen on
    # a split of SST-2's *training* set (1 000 held-out training sentences, never dev; minilm, rank 16,
    # 200 steps of 8, seed 0): accuracy 60.0 at 1e-3, 71.4 at 3e-3, 79.5 at 1e-2, 52.2 at 3e-2 (the
    # update outgrows W's top singular directions and the model collapses to a constant prediction).
    recipe = Recipe(learning_rate=1e-2, head_learning_rate=5e-3, roles=("q", "v", "o", "mlp_out"), alpha=16.0,
                    warmup_ratio=0.06, weight_decay=0.01,
                    source="Bałazy et al. 2024 (LoRA-XS); LoRA-XS main_glue.py, scripts/run_glue.py; R's lr chosen on a "
                           "held-out split of SST-2 training data (short budgets)")

    def build(self, base: nn.Linear, name: str) -> LoRAXSModule:
        self.check_rank(base, name)
        return LoRAXSModule(base, self.rank, self.alpha, self.dropout, self.init_std, self.randomized_svd)

"""NAG-GS (Leplat, Merkulov et al., "NAG-GS: Semi-Implicit, Accelerated and Robust Stochastic
Optimizer", arXiv:2209.14937): a Gauss-Seidel (semi-implicit) discretisation of the accelerated
Nesterov flow, Algorithm 1 of the paper. Per parameter one state vector v (AdamW keeps two); per
param group the scalars α (the learning rate), μ and γ. With a = α/(1+α), b = αμ/(αμ+γ):

    x ← (1−a)·x + a·v          γ ← (1−a)·γ + a·μ          (the explicit half-step)
    v ← (1−b)·v + b·(x − ∇f(x)/μ)                          (the implicit half-step, with the new γ)

The gradient is taken at the x of the explicit half-step, so one optimizer step here is
"v-update with the current gradient, then the next explicit half-step" — the paper's sequence of
operations exactly (the first explicit half-step leaves x alone, since v starts as x, and only moves
γ; it runs at the first step). The current γ is kept in the param group under "gamma", where a
checkpoint of the optimizer's state_dict carries it.

The authors' PyTorch step (skolai/nag-gs, nag_gs/nag_gs_pytorch.py, `NAGGS.step`) computes the new
γ but stores the old one back, so γ never moves (harmless only when γ₀ = μ); here γ follows its
update. `fixed_gamma=True` is their NAG4 (γ held constant at its initial value).

Defaults are the authors' PyTorch defaults (α 1e-2, μ = γ = 1); their RoBERTa GLUE runs used
α = 5e-2, μ = γ = 1 with a constant schedule.
"""
from __future__ import annotations

import torch

from ..errors import LeanformerError


def _check_positive(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or not value > 0:
        raise LeanformerError(f"NAGGS: {name} must be a positive number, got {value!r} "
                              "(the paper's defaults: lr (α) 1e-2 to 5e-2, mu 1.0, gamma 1.0)")


class NAGGS(torch.optim.Optimizer):
    """NAG-GS. lr: the step α; mu: the strong-convexity parameter μ; gamma: the initial γ;
    fixed_gamma: keep γ constant (the NAG4 variant). Param-group keys "weight_decay" (set by
    transformers.Trainer) are accepted and applied as decoupled decay, 0 by default."""

    def __init__(self, params, lr: float = 1e-2, mu: float = 1.0, gamma: float = 1.0, fixed_gamma: bool = False,
                 weight_decay: float = 0.0):
        _check_positive("lr (α)", lr)
        _check_positive("mu", mu)
        _check_positive("gamma", gamma)
        if weight_decay < 0:
            raise LeanformerError(f"NAGGS: weight_decay must be ≥ 0, got {weight_decay}")
        super().__init__(params, dict(lr=lr, mu=mu, gamma=gamma, fixed_gamma=fixed_gamma, weight_decay=weight_decay,
                                      started=False))
        for group in self.param_groups:  # groups may override the defaults: check theirs too
            for key in ("lr", "mu", "gamma"):
                _check_positive(key, group[key])

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            alpha, mu = group["lr"], group["mu"]
            if alpha <= 0:  # a scheduler's warm-up starts at 0: nothing moves, γ included
                continue
            a = alpha / (1 + alpha)
            if not group["started"]:  # the first explicit half-step: x stays (v = x), γ moves
                group["started"] = True
                if not group["fixed_gamma"]:
                    group["gamma"] = (1 - a) * group["gamma"] + a * mu
            b = alpha * mu / (alpha * mu + group["gamma"])
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                grads = [p.grad for p in params]
                if any(g.is_sparse for g in grads):
                    raise LeanformerError("NAGGS does not take sparse gradients; use it with dense parameters")
                vs = []
                for p in params:
                    state = self.state[p]
                    if "v" not in state:
                        state["v"] = p.detach().clone()
                    vs.append(state["v"])
                # v ← (1−b)v + b·x − (b/μ)·g
                torch._foreach_mul_(vs, 1 - b)
                torch._foreach_add_(vs, params, alpha=b)
                torch._foreach_add_(vs, grads, alpha=-b / mu)
                # x ← (1−a)x + a·v (and decoupled weight decay, AdamW's convention)
                if group["weight_decay"]:
                    torch._foreach_mul_(params, 1 - alpha * group["weight_decay"])
                torch._foreach_mul_(params, 1 - a)
                torch._foreach_add_(params, vs, alpha=a)
            if not group["fixed_gamma"]:
                group["gamma"] = (1 - a) * group["gamma"] + a * mu
        return loss


def spectral_radius_on_quadratic(alpha: float, mu: float, curvature: float) -> float:
    """The per-step contraction NAG-GS (γ = μ, its fixed point) achieves on f(x) = curvature·x²/2: the
    spectral radius of its 2×2 iteration matrix on (x, v), the quantity the paper's quadratic-case
    analysis studies. With a = α/(1+α) the matrix has determinant (1−a)² and trace
    T = 2(1−a) + a²(1 − curvature/μ); its eigenvalues solve z² − T z + (1−a)² = 0."""
    a = alpha / (1 + alpha)
    trace = 2 * (1 - a) + a * a * (1 - curvature / mu)
    disc = trace * trace - 4 * (1 - a) ** 2
    if disc <= 0:
        return 1 - a
    return max(abs(trace + disc ** 0.5), abs(trace - disc ** 0.5)) / 2


def critical_step(mu: float, curvature: float) -> float:
    """The largest α for which NAG-GS (γ = μ) is stable on curvature L: an eigenvalue of the iteration
    matrix reaches −1 when (2−a)² = a²(L/μ − 1), i.e. α = 2 / (√(L/μ − 1) − 1); any α is stable
    when L ≤ 2μ (returns inf)."""
    root = (curvature / mu - 1) ** 0.5 if curvature > mu else 0.0
    return float("inf") if root <= 1 else 2 / (root - 1)

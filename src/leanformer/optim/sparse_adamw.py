"""AdamW whose state, for the parameters SparseGrad / MeProp train, exists only where a gradient
ever arrived.

SparseGrad's layers (leanformer.adapters.sparsegrad) hand back a gradient that is zero except for
k entries per step. Their paper pairs them with a sparse optimiser (torch's SparseAdam) so that the
Adam moments cost memory for the touched entries only; SparseAdam itself allocates dense moments
(zeros_like the parameter). Here a parameter marked with `mark_sparse` keeps its moments as three
flat tensors: the sorted indices ever touched and their two moments, growing as new entries
appear; untouched entries are left alone (lazy Adam, SparseAdam's rule: moments and weight decay
move only where this step's gradient is non-zero, bias correction counts the parameter's steps).
Every other parameter gets ordinary AdamW. The gradient buffer itself stays dense (zeros and k
values), so gradient accumulation, clipping and DDP's all-reduce work unchanged.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import LeanformerError

SPARSE_ATTR = "leanformer_sparse_grad"


def mark_sparse(p: nn.Parameter) -> nn.Parameter:
    setattr(p, SPARSE_ATTR, True)
    return p


def is_sparse(p: torch.Tensor) -> bool:
    return getattr(p, SPARSE_ATTR, False)


class SparseStateAdamW(torch.optim.Optimizer):
    """AdamW (lr, betas, eps, weight_decay as torch.optim.AdamW); sparse state for marked params."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        if not lr > 0 or not 0 <= betas[0] < 1 or not 0 <= betas[1] < 1 or not eps > 0 or weight_decay < 0:
            raise LeanformerError(f"SparseStateAdamW: need lr > 0, 0 ≤ betas < 1, eps > 0, weight_decay ≥ 0; got "
                                  f"lr={lr}, betas={betas}, eps={eps}, weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if is_sparse(p):
                    self._sparse_step(p, group)
                else:
                    self._dense_step(p, group)
        return loss

    def _dense_step(self, p: torch.Tensor, group: dict) -> None:
        lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        state = self.state[p]
        if not state:
            state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
        state["step"] += 1
        g = p.grad
        state["exp_avg"].lerp_(g, 1 - b1)
        state["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
        bc1, bc2 = 1 - b1 ** state["step"], 1 - b2 ** state["step"]
        if wd:
            p.mul_(1 - lr * wd)
        denom = (state["exp_avg_sq"] / bc2).sqrt_().add_(eps)
        p.addcdiv_(state["exp_avg"], denom, value=-lr / bc1)

    def _sparse_step(self, p: torch.Tensor, group: dict) -> None:
        lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        flat_grad = p.grad.reshape(-1)
        touched = flat_grad.nonzero().squeeze(1)
        state = self.state[p]
        if not state:
            state.update(step=0, index=touched.new_empty(0), exp_avg=p.new_empty(0), exp_avg_sq=p.new_empty(0))
        state["step"] += 1
        if touched.numel() == 0:
            return
        values = flat_grad[touched]
        index = state["index"]
        if index.numel():
            union = torch.cat([index, touched]).unique()  # sorted
            if union.numel() > index.numel():  # new entries: grow the state, old moments keep their places
                old = torch.searchsorted(union, index)
                for key in ("exp_avg", "exp_avg_sq"):
                    grown = p.new_zeros(union.numel())
                    grown[old] = state[key]
                    state[key] = grown
                state["index"] = index = union
        else:
            state.update(index=touched.clone(), exp_avg=p.new_zeros(touched.numel()),
                         exp_avg_sq=p.new_zeros(touched.numel()))
            index = state["index"]
        at = torch.searchsorted(index, touched)
        m = state["exp_avg"][at].lerp_(values, 1 - b1)
        v = state["exp_avg_sq"][at].mul_(b2).addcmul_(values, values, value=1 - b2)
        state["exp_avg"][at], state["exp_avg_sq"][at] = m, v
        bc1, bc2 = 1 - b1 ** state["step"], 1 - b2 ** state["step"]
        flat = p.view(-1)
        current = flat[touched]
        if wd:
            current = current * (1 - lr * wd)
        flat[touched] = current - (lr / bc1) * m / ((v / bc2).sqrt() + eps)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the tensors of an optimizer's per-parameter state."""
    return sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
               if isinstance(v, torch.Tensor))

"""Optimizers: NAG-GS (naggs.py) and the sparse-state AdamW that SparseGrad / MeProp train with.

`optimizer_for(name, model, args)` is what leanformer's training path (train/finetuning.py) hands
transformers.Trainer as `optimizer_cls_and_kwargs`: the class and its keyword arguments, read from
the TrainingArguments (learning rate, Adam betas / eps, weight decay), so Trainer builds its usual
parameter groups (and schedule) around it under one process or several.
"""
from __future__ import annotations

from ..errors import LeanformerError
from .naggs import NAGGS, critical_step, spectral_radius_on_quadratic
from .sparse_adamw import SparseStateAdamW, is_sparse, mark_sparse, state_bytes

OPTIMIZERS = ("adamw", "naggs")


def optimizer_for(name: str, model, args, *, mu: float = 1.0, gamma: float = 1.0, fixed_gamma: bool = False):
    """(optimizer class, kwargs) for `name` ∈ OPTIMIZERS, or None where Trainer's own (args.optim) serves."""
    if name not in OPTIMIZERS:
        raise LeanformerError(f"unknown optimizer {name!r}; choose one of {list(OPTIMIZERS)}")
    sparse = any(is_sparse(p) for p in model.parameters() if p.requires_grad)
    if name == "naggs":
        if sparse:
            raise LeanformerError("--optimizer naggs keeps a dense state vector per parameter, which would undo "
                                  "SparseGrad/MeProp's sparse optimizer state; use --optimizer adamw with them")
        return NAGGS, dict(lr=args.learning_rate, mu=mu, gamma=gamma, fixed_gamma=fixed_gamma)
    if sparse:
        return SparseStateAdamW, dict(lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                      eps=args.adam_epsilon, weight_decay=args.weight_decay)
    return None


__all__ = ["NAGGS", "SparseStateAdamW", "OPTIMIZERS", "optimizer_for", "mark_sparse", "is_sparse", "state_bytes",
           "critical_step", "spectral_radius_on_quadratic"]

"""Dynamic inference: models whose cost per token depends on the input, and one contract to drive them.

Two kinds exist, each a transform on `model.leanformer_stack`:
  "moefy"       dense MLPs split into experts run per token by a router (leanformer.dynamic.moe);
                τ is the routing threshold
  "early_exit"  classifier heads on intermediate layers that stop the forward pass once confident
                (registered by its own module); τ is the exit threshold

Whatever the kind, the same four calls apply (so `leanformer eval --tau` sweeps either):
  set_tau(model, τ)    τ ∈ [0, 1]
  reset_cost(model)    zero the cost counters
  cost(model)          what the forwards since the last reset executed, as fractions of the dense model:
                       {"mlp_flops_per_token", "flops_per_token", "tokens", …kind-specific keys}
  kind_of(model)       the registered kind the model carries (a clear error when it carries none)

A kind registers itself with `register(DynamicKind(...))` when its module is imported; a model that
carries a kind's transform was built (or replayed by `lf.load`) by that module, so it is registered.
FLOPs are counted as in leanformer.dynamic.flops (dense_flops_per_token).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from torch import nn

from ..errors import LeanformerError
from ..stack import applied
from .flops import dense_flops_per_token


@dataclass(frozen=True)
class DynamicKind:
    """One kind of dynamic model: the transform name it pushes on the stack, what τ means for it, and
    its implementations of the contract (each takes the model; set_tau gets an already checked τ)."""
    transform: str
    tau_means: str
    set_tau: Callable[[nn.Module, float], None]
    reset_cost: Callable[[nn.Module], None]
    cost: Callable[[nn.Module], dict]


KINDS: dict[str, DynamicKind] = {}
# how a user makes each kind, for error messages (a kind's module may not be imported yet)
HOW_TO_MAKE = {"moefy": "lf.moefy / `leanformer moefy`",
               "early_exit": "lf.EarlyExit / `leanformer finetune --early-exit ztw`"}


def register(kind: DynamicKind) -> DynamicKind:
    KINDS[kind.transform] = kind
    return kind


def kind_of(model: nn.Module) -> DynamicKind:
    """The dynamic kind `model` carries (the last one on its stack)."""
    names = [e.transform for e in applied(model)]
    found = [n for n in names if n in KINDS]
    if not found:
        known = sorted(set(KINDS) | set(HOW_TO_MAKE))
        raise LeanformerError(
            f"{type(model).__name__} is not a dynamic-inference model: τ applies to a model whose transform stack "
            f"holds one of {', '.join(known)} (made by " + "; ".join(f"{k}: {HOW_TO_MAKE.get(k, k)}" for k in known)
            + f"), but its stack holds {names or 'nothing'}")
    return KINDS[found[-1]]


def check_tau(tau) -> float:
    try:
        value = float(tau)
    except (TypeError, ValueError):
        raise LeanformerError(f"τ must be a number in [0, 1], got {tau!r}") from None
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        raise LeanformerError(f"τ must be in [0, 1], got {tau!r}")
    return value


def set_tau(model: nn.Module, tau: float) -> None:
    kind = kind_of(model)
    kind.set_tau(model, check_tau(tau))


def reset_cost(model: nn.Module) -> None:
    kind_of(model).reset_cost(model)


def cost(model: nn.Module) -> dict:
    return kind_of(model).cost(model)


__all__ = ["DynamicKind", "KINDS", "register", "kind_of", "check_tau", "set_tau", "reset_cost", "cost",
           "dense_flops_per_token"]

from . import moe as _moe  # noqa: E402  (registers "moefy")

"""Training-time regularisers on the residual stream.

CosineRegularizer (Razzhigaev et al., "Your Transformer is Secretly Linear", ACL 2024,
arXiv:2405.12250, the regularisation of their pretraining experiments): λ Σ_i (1 − cos(h_i, h_{i−1}))
over the block transitions i = 1…L, each term the mean over valid (non-padding) tokens. The paper uses
it in pretraining with λ = 0.5 to lower layer linearity. The states are the residual stream captured
with block hooks (h_0 = input of block 0, h_i = output of block i−1), i.e. before any final norm,
the same states the linearity metric is measured on.

ActivationSparsity (D2DMoE's sparsity phase: Piórczyński et al., NeurIPS 2024, §3.1; the authors'
methods/dynamic_sparsification/sparse_finetuning.py): w · the mean over the blocks' MLP activations
of either the square Hoyer measure ‖a‖₁²/‖a‖₂² of each token's activation vector (Kurtz et al. 2020,
§2.1) or its L1 norm ‖a‖₁, each the mean over valid tokens; the weight w rises linearly from 0 over
the first `warmup` fraction of the steps (the authors' "linear_warmup" reaches it at half the run).
It makes activations sparse so that a moefied model (leanformer.dynamic.moe) skips more experts;
the activations are the outputs of each block's MLP activation module (act(gate) in a gated MLP).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from ..architectures import find_blocks, find_mlp_activation
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


SPARSITY_REGS = ("hoyer", "l1")


def square_hoyer(a: torch.Tensor, dim: int = -1, eps: float = 1e-15) -> torch.Tensor:
    """‖a‖₁² / ‖a‖₂² along `dim`: between 1 (one nonzero) and the length (all equal); scale-free."""
    return a.abs().sum(dim) ** 2 / (a.pow(2).sum(dim) + eps)


@dataclass
class ActivationSparsity:
    kind: str = "hoyer"
    weight: float = 1e-3
    warmup: float = 0.5

    def __post_init__(self):
        if self.kind not in SPARSITY_REGS:
            raise LeanformerError(f"sparsity regulariser {self.kind!r} is not one of {', '.join(SPARSITY_REGS)}")
        if self.weight < 0:
            raise LeanformerError(f"sparsity weight must be ≥ 0, got {self.weight}")
        if not 0 <= self.warmup <= 1:
            raise LeanformerError(f"sparsity warmup is a fraction of the steps in [0, 1], got {self.warmup}")

    def weight_at(self, step: int, max_steps: int) -> float:
        """The weight at training step `step` of `max_steps` (linear warm-up from 0)."""
        ramp = self.warmup * max_steps
        return self.weight if ramp <= 0 else self.weight * min(1.0, step / ramp)

    def per_layer(self, activations: list[torch.Tensor], attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(L,) tensor: per block, the mean over valid tokens of the unweighted measure."""
        if not activations or any(a is None for a in activations):
            raise LeanformerError("MLP activations missing: run the model's forward inside mlp_activations(model)")
        terms = []
        for a in activations:
            per_token = square_hoyer(a.float()) if self.kind == "hoyer" else a.float().abs().sum(-1)
            if attention_mask is not None and tuple(per_token.shape) == tuple(attention_mask.shape):
                m = attention_mask.to(per_token.dtype)
                terms.append((per_token * m).sum() / m.sum().clamp_min(1))
            else:
                terms.append(per_token.mean())
        return torch.stack(terms)


@contextlib.contextmanager
def mlp_activations(model: nn.Module) -> Iterator[list]:
    """Inside the block, the list holds each block's MLP activation output of the last forward."""
    blocks, path = find_blocks(model)
    acts = [find_mlp_activation(model, b) for b in blocks]
    if any(a is None for a in acts):
        missing = [f"{path}.{i}" for i, a in enumerate(acts) if a is None]
        raise LeanformerError(f"no MLP activation module in {', '.join(missing[:3])} (looked for the architecture "
                              "table's, then a leaf named intermediate_act_fn, act_fn, activation_fn, act, activation)")
    outputs: list = [None] * len(acts)

    def keep(i):
        def hook(_module, _args, out):
            outputs[i] = out
        return hook

    handles = [a.register_forward_hook(keep(i)) for i, a in enumerate(acts)]
    try:
        yield outputs
    finally:
        for h in handles:
            h.remove()

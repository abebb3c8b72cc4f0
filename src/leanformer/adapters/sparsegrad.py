"""SparseGrad (Chekalina et al., "SparseGrad: A Selective Method for Efficient Fine-tuning of MLP
Layers", EMNLP 2024) and its MeProp baseline: train the real MLP weights, but each step only the k
largest entries of their gradient — SparseGrad in a basis where that gradient is concentrated,
MeProp in the weights' own basis.

1. Basis (the paper's method section; authors' sayankotor/sparse_grads, exps/sharing/trainers_custom.py
   and sparse_grad_matrix_spars.py, `Tucker_Decomposition`):
   the weight gradients G_t (out×in) of each MLP layer type over a few dense steps form a tensor
   (t × out × in); its HOSVD factors are the left singular vectors of the out- and in-mode
   unfoldings. Those are the eigenvectors of Σ G_t G_tᵀ (out×out) → V and of Σ G_tᵀ G_t (in×in) → Uᵀ,
   so `fit_basis` accumulates the two Gram matrices batch by batch instead of stacking the gradients
   (the same factors, without holding t full gradients). One (U, V) per layer type (all the blocks'
   up-projections share one, all the down-projections another). The gradients are taken at the
   pretrained weights in eval mode (no dropout, no weight update): deterministic, so every process
   of a distributed run and a resumed run computes the same basis, and nothing of the model changes.
2. Reparametrise (their `from_linear` / `rewert_to_linear`): W = V W' U, so W' = Vᵀ W Uᵀ and y = ((x Uᵀ) W'ᵀ) Vᵀ + b. Here, in the
   adapter API, the frozen W stays in the base Linear and the adapter trains the rotated update
   ΔW' (zero at the start): y = W x + b + V ΔW' U x — the same output as the reparametrised layer
   with W' = Vᵀ W Uᵀ + ΔW'.
3. Custom backward: form the rotated weight gradient Vᵀ (gᵀ x) Uᵀ (= (g V)ᵀ (x Uᵀ)) densely and
   keep only its top-k entries by |value|. (The authors' LLaMA variant,
   llama_ft/sparse_grad_matrix_sparse_new.py `LinearFunctionSparseGrad.backward`, takes its threshold
   from the k-th largest *signed* value and then compares magnitudes: not copied.)
   The gradient buffer is dense with k non-zeros, so accumulation, clipping and DDP work unchanged;
   the optimizer keeps state only for entries ever touched (leanformer.optim.SparseStateAdamW, the
   paper's SparseAdam).
4. Revert: lf.merge(model) folds V ΔW' U into W and lf.strip_adapters(model) leaves plain Linear
   layers (outputs equal to the trained model's within fp32 rounding).

k: `topk` entries per layer, or `budget_rank` r: k = r·(in + out), a rank-r LoRA's trainable
parameter count on the same layer (the paper's budget matching: k = 28 000 for BERT-base's
3072×768 layers ≈ LoRA r = 7). Memory: the dense ΔW' (one extra copy of the targeted weights, like
the reparametrised W' of the paper), the shared bases (in² + out² per layer type), the layer
input saved for backward, and the optimizer state of the touched entries.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LeanformerError
from ..optim.sparse_adamw import mark_sparse
from ..targets import Targets, select_linear
from .base import AdapterConfig, AdapterModule, AdaptedLinear, register
from .lora import _dropout

MLP_ROLES = ("mlp_in", "mlp_out")  # the up- and down-projections (leanformer.architectures roles)


def keep_top_k(g: torch.Tensor, k: int) -> torch.Tensor:
    """g with all but its k largest-|value| entries set to zero."""
    flat = g.reshape(-1)
    if k >= flat.numel():
        return g
    index = flat.abs().topk(k, sorted=False).indices
    out = torch.zeros_like(flat)
    out[index] = flat[index]
    return out.view_as(g)


def rotated_update(delta: torch.Tensor, basis_in: torch.Tensor | None, basis_out: torch.Tensor | None) -> torch.Tensor:
    """V Δ U, the update in the weights' own basis (dense products: on CPU they beat torch.sparse.mm
    at the few-percent densities Δ reaches)."""
    if basis_in is None:
        return delta
    return basis_out @ delta @ basis_in


class _TopKGradLinear(torch.autograd.Function):
    """y = x (V Δ U)ᵀ, exact; dΔ = top-k of Vᵀ (gᵀ x) Uᵀ = (g V)ᵀ (x Uᵀ), the rotated weight gradient.
    U / V None: no rotation (MeProp). The forward forms the update V Δ U once (rotated_update) instead
    of rotating every token; the backward rotates whichever is smaller, the N tokens' gradients and
    inputs (N·(out² + in²)) or the out × in weight gradient (out·in·(out + in))."""

    @staticmethod
    def forward(ctx, x, delta, basis_in, basis_out, k):
        update = rotated_update(delta, basis_in, basis_out)
        ctx.save_for_backward(x, update, basis_in, basis_out)
        ctx.k = k
        return F.linear(x, update)

    @staticmethod
    def backward(ctx, grad_y):
        x, update, basis_in, basis_out = ctx.saved_tensors
        grad_x = grad_delta = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_y @ update
        if ctx.needs_input_grad[1]:
            g, h = grad_y.reshape(-1, grad_y.shape[-1]), x.reshape(-1, x.shape[-1])
            if basis_in is None:
                dense = g.T @ h
            else:
                (out, inp), n = update.shape, g.shape[0]
                if n * (out * out + inp * inp) < out * inp * (out + inp):
                    dense = (g @ basis_out).T @ (h @ basis_in.T)
                else:
                    dense = basis_out.T @ (g.T @ h) @ basis_in.T
            grad_delta = keep_top_k(dense, ctx.k)
        return grad_x, grad_delta, None, None, None


class SparseGradModule(AdapterModule):
    """The trained update ΔW' of one Linear (in the basis when U, V are given) and its top-k backward."""

    def __init__(self, base: nn.Linear, k: int, dropout: float, basis: tuple[torch.Tensor, torch.Tensor] | None,
                 owns_basis: bool = True):
        super().__init__()
        weight = base.weight
        self.delta = mark_sparse(nn.Parameter(torch.zeros_like(weight, dtype=weight.dtype)))
        self.k = k
        if basis is not None:
            # One (U, V) per layer type, the same tensors in every layer of that type; only the first layer's
            # buffers are in the state dict (savers refuse shared tensors), and loading copies into them in
            # place, so the other layers see the loaded basis too.
            self.register_buffer("basis_in", basis[0], persistent=owns_basis)    # U (in × in): in-mode factors, rows
            self.register_buffer("basis_out", basis[1], persistent=owns_basis)   # V (out × out): out-mode factors, columns
        else:
            self.basis_in = self.basis_out = None
        self.drop = _dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _TopKGradLinear.apply(self.drop(x), self.delta, self.basis_in, self.basis_out, self.k)

    def delta_weight(self) -> torch.Tensor:
        return rotated_update(self.delta, self.basis_in, self.basis_out)

    def touched(self) -> int:
        """Entries of ΔW' that training has moved so far."""
        return int(torch.count_nonzero(self.delta))


def layer_type(name: str) -> str:
    """A layer's name without its block index: "encoder.layer.3.output.dense" → "output.dense"."""
    parts = name.split(".")
    last_index = next((i for i in range(len(parts) - 1, -1, -1) if parts[i].isdigit()), -1)
    return ".".join(parts[last_index + 1:])


@register
@dataclass
class SparseGrad(AdapterConfig):
    """Top-k rotated-gradient training of the MLP weights. targets None: every block's MLP up- and
    down-projection (found by leanformer.architectures roles mlp_in / mlp_out). topk: entries
    updated per layer per step; or budget_rank r: k = r·(in + out), a rank-r LoRA's budget.
    basis_steps: batches whose gradients fit the basis (fit_basis; finetune calls it)."""
    targets: Targets = None
    topk: int | None = None
    budget_rank: int | None = 8
    basis_steps: int = 30
    basis_fitted: bool = field(default=False, metadata={"cli": False})
    bases: dict | None = field(default=None, repr=False, compare=False, metadata={"cli": False})

    method = "sparsegrad"
    rotate = True  # MeProp: False

    def __post_init__(self):
        if self.topk is None and self.budget_rank is None:
            raise LeanformerError(f"{self.method}: give topk (entries per layer) or budget_rank (a LoRA rank to match)")
        for key in ("topk", "budget_rank"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise LeanformerError(f"{self.method}: {key} must be a positive integer, got {value!r}")
        if not isinstance(self.basis_steps, int) or self.basis_steps <= 0:
            raise LeanformerError(f"{self.method}: basis_steps must be a positive integer, got {self.basis_steps!r}")

    def to_dict(self) -> dict:  # the bases are tensors: they are saved with the layers, not in the config
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("filter_fn", "bases")}
        if d["targets"] is not None and not isinstance(d["targets"], str):
            d["targets"] = list(d["targets"])
        d["modules_to_save"] = list(d["modules_to_save"])
        return {"method": self.method, **d}

    # -- which layers ----------------------------------------------------------------------------

    def default_layers(self, model: nn.Module) -> list[str]:
        """Full names of the MLP up- and down-projections, with filter_fn applied."""
        from ..architectures import role_layers

        try:
            names = role_layers(model, MLP_ROLES)
        except LeanformerError as e:
            raise LeanformerError(f"{self.method} trains the MLP up- and down-projections (roles "
                                  f"{', '.join(MLP_ROLES)}) and found none on {type(model).__name__}: {e}. "
                                  "Pass targets=[...] naming the MLP Linear layers") from e
        if self.filter_fn is not None:
            names = select_linear(model, names, self.filter_fn)
        return names

    def layers(self, model: nn.Module) -> list[str]:
        return self.default_layers(model) if self.targets is None else select_linear(model, self.targets, self.filter_fn)

    def k_for(self, base: nn.Linear) -> int:
        return self.topk if self.topk is not None else self.budget_rank * (base.in_features + base.out_features)

    # -- the basis -------------------------------------------------------------------------------

    def fit_basis(self, model: nn.Module, batches: Iterable[dict]) -> None:
        """Fit one (U, V) per layer type from the weight gradients of up to basis_steps batches (dicts
        the model takes as keyword arguments, labels included, so the output has .loss). The model's
        weights, requires_grad flags and train/eval mode are as before afterwards."""
        if not self.rotate:
            self.basis_fitted = True
            return
        names = self.layers(model)
        layers = {}
        for n in names:
            m = model.get_submodule(n)
            layers[n] = m.base_layer if isinstance(m, AdaptedLinear) else m
        flags = {p: p.requires_grad for p in model.parameters()}
        was_training = model.training
        grams: dict[str, list[torch.Tensor]] = {}
        model.eval()
        try:
            for p in model.parameters():
                p.requires_grad_(False)
            weights = [layers[n].weight for n in names]
            for w in weights:
                w.requires_grad_(True)
            seen = 0
            for batch in batches:
                if seen == self.basis_steps:
                    break
                out = model(**batch)
                if getattr(out, "loss", None) is None:
                    raise LeanformerError(f"{self.method}: fit_basis needs batches with labels (the model returned no loss)")
                for n, g in zip(names, torch.autograd.grad(out.loss, weights)):
                    g = g.double()
                    gin, gout = grams.setdefault(layer_type(n), [g.new_zeros(g.shape[1], g.shape[1]),
                                                                 g.new_zeros(g.shape[0], g.shape[0])])
                    gin += g.T @ g
                    gout += g @ g.T
                seen += 1
        finally:
            for p, flag in flags.items():
                p.requires_grad_(flag)
            model.train(was_training)
        if not grams:
            raise LeanformerError(f"{self.method}: fit_basis got no batches; it needs up to {self.basis_steps}")
        dtype = layers[names[0]].weight.dtype
        bases = {}
        for t, (gin, gout) in grams.items():
            _, vecs_in = torch.linalg.eigh(gin)    # ascending; the order does not matter for top-k
            _, vecs_out = torch.linalg.eigh(gout)
            bases[t] = (vecs_in.T.contiguous().to(dtype), vecs_out.contiguous().to(dtype))
        self.bases, self.basis_fitted = bases, True

    # -- the layer -------------------------------------------------------------------------------

    def build(self, base: nn.Linear, name: str) -> SparseGradModule:
        k = self.k_for(base)
        size = base.out_features * base.in_features
        if k > size:
            raise LeanformerError(f"{self.method}: top-k {k} is larger than layer {name} "
                                  f"({base.out_features}×{base.in_features} = {size} entries); use topk ≤ {size}"
                                  + (f" or budget_rank ≤ {size // (base.in_features + base.out_features)}"
                                     if self.topk is None else ""))
        if not self.rotate:
            return SparseGradModule(base, k, self.dropout, None)
        kind = layer_type(name)
        if self.bases is None:
            if not self.basis_fitted:
                raise LeanformerError(f"{self.method} needs its gradient basis first: config.fit_basis(model, batches) "
                                      "before lf.adapt, or train with lf.finetune(method=config), which fits it")
            # replayed from a save: identity placeholders, the fitted basis arrives with the state dict
            self.__dict__["_placeholders"] = True
            self.bases = {}
        if kind not in self.bases:
            if not self.__dict__.get("_placeholders"):
                raise LeanformerError(f"{self.method}: no basis for layer type {kind!r} (fitted for "
                                      f"{sorted(self.bases)}); fit_basis on the same layers")
            dtype = base.weight.dtype
            self.bases[kind] = (torch.eye(base.in_features, dtype=dtype), torch.eye(base.out_features, dtype=dtype))
        owners = self.__dict__.setdefault("_basis_owners", {})  # layer type → the layer whose buffers are saved
        owns = owners.setdefault(kind, name) == name
        return SparseGradModule(base, k, self.dropout, self.bases[kind], owns_basis=owns)


@register
@dataclass
class MeProp(SparseGrad):
    """SparseGrad's baseline: the same top-k of the weight gradient, in the weights' own basis."""
    method = "meprop"
    rotate = False


def touched_entries(model: nn.Module) -> dict[str, int]:
    """Per trained layer: how many entries of its update the training has moved."""
    return {n: layer.adapters[layer.active].touched() for n, layer in model.named_modules()
            if isinstance(layer, AdaptedLinear) and layer.active is not None
            and isinstance(layer.adapters[layer.active], SparseGradModule)}

"""KronA (Edalati et al. 2022): ΔW = s·(A ⊗ B), applied without ever forming the Kronecker product.

A is a1×a2, B is b1×b2 with a1·b1 = out and a2·b2 = in. Because (A ⊗ B)·vec(X) = vec(A X Bᵀ) for
x reshaped row-major to X (a2×b2), the update costs O(in·(a1+b1)) per token instead of O(in·out) —
the reason it is faster than peft's LoKr, which rebuilds ΔW = w1 ⊗ w2 in every forward pass.

Variants (`variant=`):
  "linear"    the adapter sits parallel to each targeted Linear (mergeable, exportable to LoKr);
  "block"     KronA^B: parallel to the whole feed-forward block — it reads the FFN's input and adds
              to the output of the targeted FFN output projection (not mergeable: it spans two layers);
  "block_res" KronA^B_res: "block" plus a learnable scaled residual s_res·x (s_res starts at 0).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import LeanformerError
from ..targets import LINEAR_TYPES, linear_shape
from .base import AdapterConfig, AdapterModule, adapted_layers, register
from .lora import _dropout
from .recipe import Recipe

VARIANTS = ("linear", "block", "block_res")


def factorization(dim: int) -> tuple[int, int]:
    """(m, n), m ≤ n, m·n = dim, as close to square as the divisors allow — peft LoKr's default
    split, so automatically shaped KronA adapters export to LoKr."""
    m, n = 1, dim
    while m < n:
        new_m = m + 1
        while dim % new_m:
            new_m += 1
        new_n = dim // new_m
        if new_m + new_n > m + n:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


def kron_apply(a: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(A ⊗ B) x for every row of x (..., a2·b2) → (..., a1·b1), via A X Bᵀ."""
    a1, a2 = a.shape
    b1, b2 = b.shape
    lead = x.shape[:-1]
    xm = x.reshape(-1, a2, b2)
    y = torch.matmul(a, torch.matmul(xm, b.T))  # (N, a1, b1)
    return y.reshape(*lead, a1 * b1)


class KronAModule(AdapterModule):
    def __init__(self, a_shape: tuple[int, int], b_shape: tuple[int, int], scale: float, dropout: float,
                 variant: str = "linear"):
        super().__init__()
        self.kron_A = nn.Parameter(torch.zeros(*a_shape))  # zero: ΔW = 0 at the start
        self.kron_B = nn.Parameter(torch.empty(*b_shape))
        nn.init.kaiming_uniform_(self.kron_B, a=math.sqrt(5))
        self.scaling = scale
        self.variant = variant
        self.drop = _dropout(dropout)
        if variant == "block_res":
            self.res_scale = nn.Parameter(torch.zeros(()))
        self._block_input: torch.Tensor | None = None  # set by a pre-hook on the FFN (block variants)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.variant != "linear":
            if self._block_input is None:
                raise RuntimeError("KronA block adapter ran before its feed-forward block saw an input")
            x, self._block_input = self._block_input, None
        y = kron_apply(self.kron_A, self.kron_B, self.drop(x)) * self.scaling
        if self.variant == "block_res":
            y = y + self.res_scale * x
        return y

    def delta_weight(self) -> torch.Tensor:
        if self.variant != "linear":
            raise LeanformerError(f"KronA variant {self.variant!r} spans the whole feed-forward block and "
                                  "cannot be merged into one weight; use variant='linear' to merge")
        return torch.kron(self.kron_A, self.kron_B) * self.scaling


@register
@dataclass
class KronA(AdapterConfig):
    """ΔW = alpha·(A ⊗ B). `a_shape` / `b_shape` fix the factor shapes (give one, the other follows;
    both must multiply out to the layer's out×in); by default both are near-square, as peft LoKr."""
    alpha: float = 1.0
    a_shape: tuple[int, int] | None = None
    b_shape: tuple[int, int] | None = None
    variant: str = "linear"
    block_input: str | None = None  # block variants: module whose input is the FFN input (auto if None)
    method = "krona"
    # KronA has no public code and its paper (Edalati et al. 2022, §4) gives no per-task learning rate we
    # could retrieve; placement and scale follow the paper (parallel to Wq and Wv, ΔW = s·A⊗B, s = 1).
    # The learning rate was chosen on a split of SST-2's *training* set (1 000 held-out training
    # sentences, never dev; minilm, 200 steps of 8, seed 0): accuracy 84.7 at 1e-2, 79.1 at 3e-2. At
    # 1e-3 — the rate of an earlier benchmark, where KronA and LoKr sat near chance — A (zero at the
    # start) moves so little in a few hundred steps that ΔW stays ≈ 0 (SST-2 training loss 0.686 → 0.682
    # in 80 steps of 32, the same as at 1e-4: only the head learned).
    recipe = Recipe(learning_rate=1e-2, head_learning_rate=None, roles=("q", "v"), alpha=1.0, warmup_ratio=0.06,
                    weight_decay=0.0, source="Edalati et al. 2022 (KronA) for placement and scale; learning rate "
                                             "chosen on a held-out split of SST-2 training data")

    def shapes(self, out_f: int, in_f: int, name: str) -> tuple[tuple[int, int], tuple[int, int]]:
        a, b = self.a_shape, self.b_shape
        if a is None and b is None:
            a = (factorization(out_f)[0], factorization(in_f)[0])
        if a is not None and b is None:
            a = tuple(int(v) for v in a)
            if a[0] <= 0 or a[1] <= 0 or out_f % a[0] or in_f % a[1]:
                raise LeanformerError(f"krona: a_shape {a} does not divide layer {name} ({out_f}×{in_f}); "
                                      f"a1 must divide {out_f} and a2 must divide {in_f}")
            b = (out_f // a[0], in_f // a[1])
        elif b is not None and a is None:
            b = tuple(int(v) for v in b)
            if b[0] <= 0 or b[1] <= 0 or out_f % b[0] or in_f % b[1]:
                raise LeanformerError(f"krona: b_shape {b} does not divide layer {name} ({out_f}×{in_f})")
            a = (out_f // b[0], in_f // b[1])
        a, b = tuple(int(v) for v in a), tuple(int(v) for v in b)
        if a[0] * b[0] != out_f or a[1] * b[1] != in_f:
            raise LeanformerError(
                f"krona: factor shapes A {a} ⊗ B {b} give a {a[0] * b[0]}×{a[1] * b[1]} update, but layer "
                f"{name} is {out_f}×{in_f} (need a1·b1 = {out_f} and a2·b2 = {in_f})")
        return a, b

    def build(self, base: nn.Linear, name: str) -> KronAModule:
        if self.variant not in VARIANTS:
            raise LeanformerError(f"krona: unknown variant {self.variant!r}; choose from {VARIANTS}")
        in_f, out_f = linear_shape(base)
        if self.variant != "linear":
            in_f = self._block_module_for(name)[1]
            if self.variant == "block_res" and in_f != out_f:
                raise LeanformerError(f"krona block_res needs the FFN input width ({in_f}) to equal the output "
                                      f"width of {name} ({out_f})")
        a, b = self.shapes(out_f, in_f, name)
        return KronAModule(a, b, self.alpha, self.dropout, self.variant)

    # -- block variants: find the feed-forward block whose input the adapter reads -----------------
    _model = None  # set by prepare(); a class attribute, not a config field

    def _block_module_for(self, target: str) -> tuple[str, int]:
        model = self._model
        if model is None:
            raise LeanformerError("krona block variants need the model; use lf.adapt(model, config)")
        candidates = [self.block_input] if self.block_input else ["intermediate", "mlp", "feed_forward", "ffn"]
        parts = target.split(".")
        for depth in range(len(parts) - 1, -1, -1):
            prefix = ".".join(parts[:depth])
            for c in candidates:
                full = f"{prefix}.{c}" if prefix else c
                try:
                    mod = model.get_submodule(full)
                except AttributeError:
                    continue
                width = _input_width(mod)
                if width is not None and full != target:
                    return full, width
        if not self.block_input:  # no FFN module (OPT keeps fc1/fc2 in the block): the MLP input layer's input
            from ..architectures import find_blocks, role_layers

            blocks_path = find_blocks(model)[1] + "."
            block = blocks_path + target[len(blocks_path):].split(".", 1)[0] + "." if target.startswith(blocks_path) else None
            try:
                mlp_in = [n for n in role_layers(model, ("mlp_in",)) if block and n.startswith(block) and n != target]
            except LeanformerError:
                mlp_in = []
            if mlp_in:
                return mlp_in[0], _input_width(model.get_submodule(mlp_in[0]))
        raise LeanformerError(
            f"krona {self.variant}: found no feed-forward block ({', '.join(candidates)}) around {target}; "
            "set block_input to the module whose input is the FFN input")

    def prepare(self, model: nn.Module) -> None:
        object.__setattr__(self, "_model", model)

    def on_adapt(self, model: nn.Module, name: str, modules: list[KronAModule]) -> None:
        if self.variant == "linear":
            return
        for layer_name, layer in adapted_layers(model):
            if name not in layer.adapters:
                continue
            block, _ = self._block_module_for(layer_name)
            adapter = layer.adapters[name]

            def grab(_m, args, adapter=adapter, layer=layer):
                if layer.active == name:
                    adapter._block_input = args[0]

            model.get_submodule(block).register_forward_pre_hook(grab)


def _input_width(module: nn.Module) -> int | None:
    """in_features of the first Linear-like layer inside `module` (the FFN's input width)."""
    for m in module.modules():
        if isinstance(m, tuple(LINEAR_TYPES)) or isinstance(getattr(m, "base_layer", None), tuple(LINEAR_TYPES)):
            return linear_shape(m)[0]
    return None

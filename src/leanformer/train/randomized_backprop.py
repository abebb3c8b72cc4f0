"""Randomized backprop through linear layers (Bershatsky, Mikhalev, Katrutsa, Gusak, Merkulov,
Oseledets, "Memory-Efficient Backpropagation through Large Linear Layers", arXiv:2201.13195):
the forward is exact; what a Linear saves for its weight gradient is a sketch S·X of its input X
(N tokens × in) along the token dimension, k = ⌈ratio·N⌉ rows, instead of X itself. Backward
regenerates S from a stored seed and estimates

    ∂L/∂W = Gᵀ X  ≈  (S G)ᵀ (S X) = Gᵀ SᵀS X,      unbiased because E[SᵀS] = I;

the input and bias gradients (G W, Σ G) stay exact. Sketches (the paper's three families), each scaled so E[SᵀS] = I:
  gaussian    S_ij ~ N(0, 1/k);
  rademacher  S_ij = ±1/√k;
  dct         k rows of the orthonormal DCT-II matrix C (N×N) drawn uniformly with replacement,
              times √(N/k): E[SᵀS] = (N/k)·k·(1/N)·CᵀC = I. The authors' code (skolai/fewbit,
              fewbit/functional/linear.py, the 'dct' / 'dft' branches) multiplies by k·N instead of
              N/k, off by k²; not copied.
Layers that read the same input tensor (BERT's query / key / value) share one sketch, so their
saved memory is one k × in block, as their exact inputs were one N × in tensor.

`RandomizedBackprop(ratio, sketch)` is the config; `apply_randomized_backprop(model, config)` swaps
the trainable nn.Linear layers for `RandomizedLinear` (an nn.Linear holding the same Parameter
objects, so names, state dicts and optimizers are unchanged) and `remove_randomized_backprop`
swaps them back. lf.finetune(randomized_backprop=...) does both around training.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LeanformerError
from ..targets import Targets, select_linear, set_module

SKETCHES = ("gaussian", "rademacher", "dct")


@dataclass
class RandomizedBackprop:
    """ratio: fraction of the N = batch·sequence token rows kept in the saved sketch, in (0, 1];
    sketch: gaussian | rademacher | dct; targets: which Linear layers (default every Linear of the
    transformer body; heads keep exact gradients)."""
    ratio: float = 0.5
    sketch: str = "gaussian"
    targets: Targets = "all-linear"

    def __post_init__(self):
        if not isinstance(self.ratio, (int, float)) or not 0 < self.ratio <= 1:
            raise LeanformerError(f"randomized backprop: ratio must be in (0, 1] (the fraction of token rows kept), "
                                  f"got {self.ratio!r}; e.g. 0.5, 0.2 or 0.1")
        if self.sketch not in SKETCHES:
            raise LeanformerError(f"randomized backprop: unknown sketch {self.sketch!r}; choose one of {list(SKETCHES)}")

    def rows(self, n: int) -> int:
        return max(1, math.ceil(self.ratio * n))


def sketch_matrix(kind: str, k: int, n: int, seed: int, device, dtype) -> torch.Tensor:
    """The k × n sketch S for `seed` (the same S on every call with the same arguments)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    if kind == "gaussian":
        s = torch.randn(k, n, generator=g) / math.sqrt(k)
    elif kind == "rademacher":
        s = (torch.randint(0, 2, (k, n), generator=g) * 2 - 1).to(torch.float32) / math.sqrt(k)
    elif kind == "dct":
        rows = torch.randint(0, n, (k,), generator=g).to(torch.float64)
        t = torch.arange(n, dtype=torch.float64)
        c = torch.cos(math.pi * (t[None, :] + 0.5) * rows[:, None] / n) * math.sqrt(2 / n)  # DCT-II rows
        c[rows == 0] = 1 / math.sqrt(n)
        s = (c * math.sqrt(n / k)).to(torch.float32)
    else:
        raise LeanformerError(f"unknown sketch {kind!r}; choose one of {list(SKETCHES)}")
    return s.to(device=device, dtype=dtype)


class _SketchedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, sketched_x, seed, kind):
        ctx.save_for_backward(sketched_x, weight)
        ctx.seed, ctx.kind, ctx.has_bias = seed, kind, bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_y):
        sketched_x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_y @ weight
        g = grad_y.reshape(-1, grad_y.shape[-1])
        if ctx.needs_input_grad[1]:
            s = sketch_matrix(ctx.kind, sketched_x.shape[0], g.shape[0], ctx.seed, g.device, g.dtype)
            grad_w = (s @ g).T @ sketched_x
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g.sum(0)
        return grad_x, grad_w, grad_b, None, None, None


class _SharedSketch:
    """The last input sketched, so consecutive layers reading the same tensor in one forward pass
    reuse its sketch. A layer that meets the same tensor again (a second pass over it) gets a
    fresh sketch: the estimates of separate passes stay independent."""

    def __init__(self):
        self.source = None  # weakref to the input tensor
        self.version = -1
        self.seed = 0
        self.sketched = None
        self.users: set[int] = set()

    def get(self, x: torch.Tensor, config: RandomizedBackprop, user: nn.Module) -> tuple[torch.Tensor, int]:
        if (self.source is not None and self.source() is x and x._version == self.version
                and id(user) not in self.users):
            self.users.add(id(user))
            return self.sketched, self.seed
        flat = x.reshape(-1, x.shape[-1])
        seed = int(torch.randint(0, 2 ** 62, (1,)))  # from the global RNG: follows the run's seed
        s = sketch_matrix(config.sketch, config.rows(flat.shape[0]), flat.shape[0], seed, x.device, x.dtype)
        sketched = s @ flat.detach()
        self.source, self.version, self.seed, self.sketched = weakref.ref(x), x._version, seed, sketched
        self.users = {id(user)}
        return sketched, seed


class RandomizedLinear(nn.Linear):
    """nn.Linear whose backward estimates the weight gradient from a sketch of its input."""

    def __init__(self, base: nn.Linear, config: RandomizedBackprop, shared: _SharedSketch):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # the same Parameter objects
        self.config, self.shared = config, shared
        self.train(base.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() and self.weight.requires_grad):
            return F.linear(x, self.weight, self.bias)
        sketched, seed = self.shared.get(x, self.config, self)
        return _SketchedLinear.apply(x, self.weight, self.bias, sketched, seed, self.config.sketch)

    def plain(self) -> nn.Linear:
        layer = nn.Linear.__new__(nn.Linear)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = self.in_features, self.out_features
        layer.weight, layer.bias = self.weight, self.bias
        layer.train(self.training)
        return layer


def apply_randomized_backprop(model: nn.Module, config: RandomizedBackprop) -> list[str]:
    """Swap the targeted plain nn.Linear layers whose weight trains for RandomizedLinear; the names."""
    shared = _SharedSketch()
    chosen = [n for n in select_linear(model, config.targets)
              if type(model.get_submodule(n)) is nn.Linear and model.get_submodule(n).weight.requires_grad]
    if not chosen:
        raise LeanformerError("randomized backprop found no trainable nn.Linear layer among the targets "
                              f"{config.targets!r} (frozen weights need no saved input; adapters train their own "
                              "small layers): use it with full fine-tuning")
    for n in chosen:
        set_module(model, n, RandomizedLinear(model.get_submodule(n), config, shared))
    return chosen


def remove_randomized_backprop(model: nn.Module) -> None:
    for n, m in list(model.named_modules()):
        if isinstance(m, RandomizedLinear):
            set_module(model, n, m.plain())


def saved_for_backward(model: nn.Module, batch: dict) -> dict[str, int]:
    """Bytes autograd holds for the backward pass after one forward of `model(**batch)`, measured with
    torch.autograd.graph.saved_tensors_hooks: "activations", every saved tensor that is not a
    parameter or buffer (each storage counted once, however many ops save it), and "linear_inputs",
    the part saved by Linear layers (nn.Linear and its subclasses, RandomizedLinear included)."""
    fixed = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, list] = {}  # storage → [bytes, saved by a Linear]
    depth = [0]

    def pack(t: torch.Tensor):
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. some wrapper subclasses)
            return t
        key = storage.data_ptr()
        if key not in fixed:
            entry = saved.setdefault(key, [storage.nbytes(), False])
            entry[1] = entry[1] or depth[0] > 0
        return t

    def enter(*_):
        depth[0] += 1

    def leave(*_):
        depth[0] -= 1

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Linear):
            handles += [m.register_forward_pre_hook(enter), m.register_forward_hook(leave)]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(**batch)
        del out
    finally:
        for h in handles:
            h.remove()
    return {"activations": sum(b for b, _ in saved.values()), "linear_inputs": sum(b for b, lin in saved.values() if lin)}

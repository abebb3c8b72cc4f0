"""Which Linear layers a transform applies to: one selection rule shared by `adapt` and `quantize`,
and the one way to read a Linear-like layer's shape and (out, in) weight.

"Linear layers" are nn.Linear (and subclasses) and transformers' Conv1D (GPT-2's family), which
computes the same y = x Wᵀ + b but stores W transposed, as (in, out): `linear_shape` and
`dense_weight` hide the difference from every transform.

`targets` is one of
  None or "all-linear"  every Linear of the transformer body: task / pooling heads and the output
                        embedding are left out (peft's "all-linear" does the same);
  a string              a regular expression matched against whole module names;
  a list of strings     module names or name suffixes: "query" matches "encoder.layer.0.attention.self.query";
and `filter_fn(module, name) -> bool`, when given, keeps only the layers it accepts (torchao's
`filter_fn` shape).

Transforms replace Linear layers by modules of their own (a quantized layer, an adapter wrapper);
they register those types here, so a stack of transforms keeps selecting by the original names:
a replacement counts as a Linear layer and a wrapper stands for the layer it wraps.
"""
from __future__ import annotations

import re
from typing import Callable, Sequence

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .constants import HEAD_MODULE_NAMES
from .errors import LeanformerError

Targets = Sequence[str] | str | None
FilterFn = Callable[[nn.Module, str], bool]

LINEAR_TYPES: list[type[nn.Module]] = [nn.Linear, Conv1D]  # modules that compute y = x Wᵀ + b
WRAPPER_TYPES: list[type[nn.Module]] = []  # modules holding a Linear-like `base_layer`


def register_linear_type(cls: type[nn.Module]) -> type[nn.Module]:
    if cls not in LINEAR_TYPES:
        LINEAR_TYPES.append(cls)
    return cls


def register_wrapper_type(cls: type[nn.Module]) -> type[nn.Module]:
    if cls not in WRAPPER_TYPES:
        WRAPPER_TYPES.append(cls)
    return cls


def is_transposed(module: nn.Module) -> bool:
    """True for a layer that stores its weight as (in, out) (Conv1D), also behind a wrapper."""
    module = getattr(module, "base_layer", module)
    return isinstance(module, Conv1D)


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear-like layer, a Conv1D, or a wrapper of one."""
    module = getattr(module, "base_layer", module)
    if isinstance(module, Conv1D):
        return module.nx, module.nf
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return int(module.in_features), int(module.out_features)
    raise LeanformerError(f"{type(module).__name__} is not a Linear-like layer (no in_features/out_features)")


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The (out, in) weight a Linear-like layer computes with: a view of nn.Linear's weight, the
    transpose view of a Conv1D's, a quantized layer's rebuilt weight."""
    module = getattr(module, "base_layer", module)
    if isinstance(module, Conv1D):
        return module.weight.T
    weight = getattr(module, "weight", None)  # a quantized layer's property rebuilds it
    if isinstance(weight, torch.Tensor):
        return weight
    raise LeanformerError(f"{type(module).__name__} holds no dense weight")


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every Linear-like layer by name; a wrapper appears under its own name, its base_layer not at all."""
    out: dict[str, nn.Module] = {}
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(w + ".") for w in inside):
            continue
        if isinstance(module, tuple(WRAPPER_TYPES)):
            inside.append(name)
            out[name] = module
        elif isinstance(module, tuple(LINEAR_TYPES)):
            out[name] = module
    return out


def head_modules(model: nn.Module) -> list[str]:
    """Names of the task-head modules a head class adds around the base model (top-level children
    with parameters other than the base model): ["classifier"] on BERT, ["pre_classifier",
    "classifier"] on DistilBERT, ["pooler", "classifier"] on DeBERTa-v2, ["score"] on decoders.
    The output embedding (lm_head, tied or not) is not a task head."""
    base = getattr(model, "base_model", None) or model
    if base is model:
        return []
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [n for n, child in model.named_children()
            if child is not base and child is not out_emb and any(True for _ in child.parameters())]


def head_names(model: nn.Module) -> set[str]:
    """Names of what is not transformer body: the usual head names (HEAD_MODULE_NAMES) and the task
    head modules this architecture's head class adds (head_modules)."""
    return set(HEAD_MODULE_NAMES) | set(head_modules(model))


def is_head(model: nn.Module, name: str, module: nn.Module, heads: set[str] | None = None) -> bool:
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out_emb is not None and (module is out_emb or getattr(module, "base_layer", None) is out_emb):
        return True
    heads = head_names(model) if heads is None else heads
    return any(part in heads for part in name.split("."))


def _matches_suffix(name: str, suffixes: Sequence[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in suffixes)


def select_linear(model: nn.Module, targets: Targets = None, filter_fn: FilterFn | None = None) -> list[str]:
    """Names of the Linear layers `targets` (and `filter_fn`) select; a clear error when none match."""
    layers = linear_layers(model)
    names = list(layers)
    if targets is None or targets == "all-linear":
        heads = head_names(model)
        chosen = [n for n in names if not is_head(model, n, layers[n], heads)]
    elif isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except re.error as e:
            raise LeanformerError(f"targets regex {targets!r} is invalid: {e}") from e
        chosen = [n for n in names if pattern.fullmatch(n)]
    else:
        targets = list(targets)
        if not targets:
            raise LeanformerError("targets is empty; give module-name suffixes, a regex, or 'all-linear'")
        chosen = [n for n in names if _matches_suffix(n, targets)]
        if not chosen:
            others = [n for n, _ in model.named_modules() if n and _matches_suffix(n, targets)]
            if others:
                raise LeanformerError(
                    f"targets {targets} match only modules that are not Linear layers ({others[:5]}); "
                    f"the Linear layers are: {suffix_summary(names)}")
    if filter_fn is not None:
        chosen = [n for n in chosen if filter_fn(layers[n], n)]
    if not chosen:
        raise LeanformerError(
            f"targets {targets!r}{' with filter_fn' if filter_fn else ''} match no Linear layer of "
            f"{type(model).__name__}. Its Linear layers are: {suffix_summary(names)} (e.g. {names[:3]}); "
            "pass suffixes like ['query', 'value'], a regex, or 'all-linear'")
    return chosen


def suffix_summary(names: list[str]) -> str:
    """The distinct name endings (layer indices removed): what a user would type as targets."""
    seen: dict[str, None] = {}
    for n in names:
        parts = n.split(".")
        last_index = next((i for i in range(len(parts) - 1, -1, -1) if parts[i].isdigit()), -1)
        seen[".".join(parts[last_index + 1:])] = None
    return ", ".join(seen)


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted `name` by `new`."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)

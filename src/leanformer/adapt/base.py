"""The adapter protocol and the one verb: `adapt(model, config)`.

A method is a config dataclass (subclass of `AdapterConfig`) whose `build(base_linear)` returns an
`AdapterModule`: a small nn.Module computing the *extra* output ΔW·x of one frozen nn.Linear and able
to produce ΔW itself (`delta_weight`) for merging and export. `adapt` wraps every targeted Linear in
an `AdaptedLinear` that holds any number of named adapters, one of them active, so several adapters
share one frozen base and switch by name (peft's convention).

Per-model bookkeeping lives in `model.leanformer_adapters` (name → config) and
`model.leanformer_active`; everything else is in the modules themselves.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from torch import nn

from ..errors import LeanformerError

# Output heads are never adapted by "all-linear" (they are trained whole or left alone), as in peft.
HEAD_NAMES = ("classifier", "score", "lm_head", "qa_outputs")


@dataclass
class AdapterConfig:
    """Fields every method shares. `targets`: a list of module-name suffixes ("query" matches
    "...attention.self.query"), a regex string matched against whole names, or "all-linear"."""
    targets: Sequence[str] | str = ("query", "value")
    dropout: float = 0.0
    # Whole modules trained alongside the adapter and saved with it (e.g. a classifier head).
    modules_to_save: Sequence[str] = ()

    method = "base"  # registry key; set by each subclass

    def build(self, base: nn.Linear, name: str) -> "AdapterModule":  # pragma: no cover - abstract
        raise NotImplementedError

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["targets"] = d["targets"] if isinstance(d["targets"], str) else list(d["targets"])
        d["modules_to_save"] = list(d["modules_to_save"])
        return {"method": self.method, **{k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}}


@dataclass
class LowRankConfig(AdapterConfig):
    """LoRA-family fields: ΔW has rank `rank` and is scaled by alpha/rank."""
    rank: int = 8
    alpha: float = 16.0

    def check_rank(self, base: nn.Linear, name: str, max_rank: int | None = None) -> None:
        limit = min(base.in_features, base.out_features) if max_rank is None else max_rank
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise LeanformerError(f"{self.method}: rank must be a positive integer, got {self.rank!r}")
        if self.rank > limit:
            raise LeanformerError(
                f"{self.method}: rank {self.rank} is larger than layer {name} allows "
                f"({base.out_features}×{base.in_features}: at most {limit})")


class AdapterModule(nn.Module):
    """ΔW·x for one Linear (scaling included) and ΔW itself, shaped like base.weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class AdaptedLinear(nn.Module):
    """A frozen nn.Linear plus named adapters; at most one active, at most one merged into W."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base_layer = base
        self.adapters = nn.ModuleDict()
        self.active: str | None = None
        self.merged: str | None = None

    # Code elsewhere in transformers reads .weight / .bias / .in_features of projection layers.
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.active is None or self.merged is not None or self.active not in self.adapters:
            return y
        return y + self.adapters[self.active](x)

    @torch.no_grad()
    def merge(self, name: str) -> None:
        if self.merged is not None:
            raise LeanformerError(f"adapter {self.merged!r} is already merged; unmerge it first")
        w = self.base_layer.weight
        w += self.adapters[name].delta_weight().to(w.dtype)
        self.merged = name

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged is None:
            return
        w = self.base_layer.weight
        w -= self.adapters[self.merged].delta_weight().to(w.dtype)
        self.merged = None


# ---------------------------------------------------------------------------------------------
# Targets


def linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, AdaptedLinear))
            and not isinstance(_parent_of(model, n), AdaptedLinear)]


def _parent_of(model: nn.Module, name: str) -> nn.Module | None:
    if "." not in name:
        return model if name else None
    return model.get_submodule(name.rsplit(".", 1)[0])


def resolve_targets(model: nn.Module, targets: Sequence[str] | str) -> list[str]:
    """Names of the Linear modules selected by `targets`; a clear error when nothing matches."""
    names = linear_names(model)
    if isinstance(targets, str) and targets == "all-linear":
        chosen = [n for n in names if n.split(".")[-1] not in HEAD_NAMES]
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
        chosen = [n for n in names if any(n == t or n.endswith("." + t) for t in targets)]
        non_linear = [n for n, m in model.named_modules() if any(n == t or n.endswith("." + t) for t in targets)
                      and n not in names and not isinstance(_parent_of(model, n), AdaptedLinear)]
        if non_linear and not chosen:
            raise LeanformerError(
                f"targets {targets} match only modules that are not nn.Linear ({non_linear[:5]}); "
                f"adapters attach to Linear layers: {_suffix_summary(names)}")
    if not chosen:
        raise LeanformerError(
            f"targets {targets!r} match no Linear module of {type(model).__name__}. "
            f"Its Linear modules are: {_suffix_summary(names)} (e.g. {names[:3]}); "
            "pass suffixes like ['query', 'value'], a regex, or 'all-linear'")
    return chosen


def _suffix_summary(names: list[str]) -> str:
    """The distinct name endings (layer indices removed) — what a user would type as targets."""
    seen: dict[str, None] = {}
    for n in names:
        parts = n.split(".")
        tail = [p for p in parts[next((i for i in range(len(parts) - 1, -1, -1) if parts[i].isdigit()), -1) + 1:]]
        seen[".".join(tail)] = None
    return ", ".join(seen)


# ---------------------------------------------------------------------------------------------
# The verb


def adapt(model: nn.Module, config: AdapterConfig, name: str = "default") -> nn.Module:
    """Inject `config`'s adapter (named `name`) into the targeted Linear layers of `model`, in place.

    All base weights are frozen; the adapter's parameters and `config.modules_to_save` train.
    Adding a second name to an adapted model keeps the first (switch with `set_adapter`).
    """
    registry = getattr(model, "leanformer_adapters", None)
    if registry is None:
        registry = {}
        model.leanformer_adapters = registry
    if name in registry:
        raise LeanformerError(f"adapter {name!r} already exists on this model; adapters: {list(registry)}")
    if any(isinstance(m, AdaptedLinear) and m.merged for m in model.modules()):
        raise LeanformerError("an adapter is merged into this model; unmerge(model) before adding another")
    chosen = resolve_targets(model, config.targets)
    if hasattr(config, "prepare"):
        config.prepare(model)
    built = []
    for n in chosen:  # build all first, so a bad rank for one layer leaves the model untouched
        module = model.get_submodule(n)
        base = module.base_layer if isinstance(module, AdaptedLinear) else module
        built.append((n, module, config.build(base, n)))
    for n, module, adapter in built:
        if not isinstance(module, AdaptedLinear):
            wrapper = AdaptedLinear(module).train(module.training)
            parent_name, _, attr = n.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, wrapper)
            module = wrapper
        adapter.to(device=module.base_layer.weight.device)
        adapter.train(module.base_layer.training)  # new modules start in train mode; follow the model
        module.adapters[name] = adapter
    registry[name] = config
    if hasattr(config, "on_adapt"):
        config.on_adapt(model, name, [a for _, _, a in built])
    set_adapter(model, name)
    return model


def adapted_layers(model: nn.Module) -> Iterator[tuple[str, AdaptedLinear]]:
    for n, m in model.named_modules():
        if isinstance(m, AdaptedLinear):
            yield n, m


def _require(model: nn.Module, name: str | None = None) -> dict:
    registry = getattr(model, "leanformer_adapters", None)
    if not registry:
        raise LeanformerError("this model has no leanformer adapters; call lf.adapt(model, config) first")
    if name is not None and name not in registry:
        raise LeanformerError(f"no adapter named {name!r}; adapters on this model: {list(registry)}")
    return registry


def set_adapter(model: nn.Module, name: str | None) -> None:
    """Make `name` the active adapter (None: run the bare base). Only it trains; the others freeze."""
    registry = _require(model, name)
    if any(m.merged is not None and m.merged != name for _, m in adapted_layers(model)):
        raise LeanformerError("another adapter is merged; unmerge(model) before switching")
    for p in model.parameters():
        p.requires_grad_(False)
    for _, layer in adapted_layers(model):
        layer.active = name
        if name is not None and name in layer.adapters:
            for p in layer.adapters[name].parameters():
                p.requires_grad_(True)
    if name is not None:
        for mod_name in registry[name].modules_to_save:
            for p in _find_modules(model, mod_name):
                p.requires_grad_(True)
    model.leanformer_active = name


def _find_modules(model: nn.Module, suffix: str) -> Iterator[nn.Parameter]:
    found = False
    for n, m in model.named_modules():
        if n == suffix or n.endswith("." + suffix):
            found = True
            yield from m.parameters()
    if not found:
        raise LeanformerError(f"modules_to_save entry {suffix!r} matches no module of {type(model).__name__}")


def active_adapter(model: nn.Module) -> str | None:
    return getattr(model, "leanformer_active", None)


def merge(model: nn.Module) -> nn.Module:
    """Fold the active adapter into the base weights (forward then costs nothing extra)."""
    name = active_adapter(model)
    _require(model, name)
    if name is None:
        raise LeanformerError("no active adapter to merge; set_adapter(model, name) first")
    for _, layer in adapted_layers(model):
        if name in layer.adapters and layer.merged != name:
            layer.merge(name)
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Subtract a merged adapter again; the base weights return to their values within fp32 rounding."""
    for _, layer in adapted_layers(model):
        layer.unmerge()
    return model


def set_rank(model: nn.Module, rank: int, name: str | None = None) -> None:
    """Choose the inference rank of a rank-nested adapter (DyLoRA) without retraining."""
    name = name or active_adapter(model)
    registry = _require(model, name)
    cfg = registry[name]
    if not hasattr(cfg, "set_rank"):
        raise LeanformerError(f"adapter {name!r} is {cfg.method}; only dylora supports set_rank")
    if any(layer.merged == name for _, layer in adapted_layers(model)):
        raise LeanformerError("unmerge(model) before changing the rank of a merged adapter")
    cfg.set_rank([layer.adapters[name] for _, layer in adapted_layers(model) if name in layer.adapters], rank)


def trainable_parameters(model: nn.Module) -> dict[str, int | float]:
    """{"trainable": n, "total": n, "percent": p}; adapter buffers (frozen factors) are not counted."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable": trainable, "total": total, "percent": 100.0 * trainable / max(total, 1)}


def print_trainable_parameters(model: nn.Module) -> None:
    c = trainable_parameters(model)
    print(f"trainable params: {c['trainable']:,} || all params: {c['total']:,} || trainable%: {c['percent']:.4f}")


def strip_adapters(model: nn.Module) -> nn.Module:
    """Replace every AdaptedLinear by its base Linear (merged adapters stay merged), in place."""
    for n, layer in list(adapted_layers(model)):
        parent_name, _, attr = n.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, layer.base_layer)
    for attr in ("leanformer_adapters", "leanformer_active"):
        if hasattr(model, attr):
            delattr(model, attr)
    return model


METHODS: dict[str, type[AdapterConfig]] = {}


def register(cls: type[AdapterConfig]) -> type[AdapterConfig]:
    METHODS[cls.method] = cls
    return cls


def config_from_dict(d: dict) -> AdapterConfig:
    d = dict(d)
    method = d.pop("method", None)
    if method not in METHODS:
        raise LeanformerError(f"unknown adapter method {method!r}; known: {sorted(METHODS)}")
    cls = METHODS[method]
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})

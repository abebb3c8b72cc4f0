"""The adapter protocol and the one verb: `adapt(model, config)`.

A method is a config dataclass (subclass of `AdapterConfig`) whose `build(base_linear)` returns an
`AdapterModule`: a small nn.Module computing the *extra* output ΔW·x of one frozen nn.Linear and able
to produce ΔW itself (`delta_weight`) for merging and export. `adapt` wraps every targeted Linear in
an `AdaptedLinear` that holds any number of named adapters, one of them active, so several adapters
share one frozen base and switch by name (peft's convention).

Each `adapt` call is one entry of the model's transform stack (leanformer.stack): the adapter's
name, config and layers. Which adapter is active, and which is merged, lives in the layers.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from torch import nn

from ..errors import LeanformerError
from ..stack import Applied, applied, push, record_base, remove
from ..targets import (FilterFn, Targets, dense_weight, linear_shape, register_wrapper_type,
                       select_linear, set_module)


@dataclass
class AdapterConfig:
    """Fields every method shares. `targets`: None (the architecture's attention query and value
    projections, peft's default choice: see leanformer.architectures.adapter_targets; resolved at
    adapt time and recorded), module-name suffixes ("query" matches "...attention.self.query"), a
    regex string matched against whole names, or "all-linear" (see leanformer.targets); `filter_fn(module, name)` narrows them further (code, not saved: a saved
    adapter records the layers it chose). `modules_to_save`: whole modules trained alongside the
    adapter and saved with it (e.g. a classifier head)."""
    targets: Targets = None
    dropout: float = 0.0
    modules_to_save: Sequence[str] = ()
    filter_fn: FilterFn | None = field(default=None, repr=False, compare=False, metadata={"cli": False})

    method = "base"  # registry key; set by each subclass

    def build(self, base: nn.Linear, name: str) -> "AdapterModule":  # pragma: no cover - abstract
        raise NotImplementedError

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "filter_fn"}
        d["targets"] = d["targets"] if d["targets"] is None or isinstance(d["targets"], str) else list(d["targets"])
        d["modules_to_save"] = list(d["modules_to_save"])
        return {"method": self.method, **{k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}}


@dataclass
class LowRankConfig(AdapterConfig):
    """LoRA-family fields: ΔW has rank `rank` and is scaled by alpha/rank."""
    rank: int = 8
    alpha: float = 16.0

    def check_rank(self, base: nn.Linear, name: str, max_rank: int | None = None) -> None:
        in_f, out_f = linear_shape(base)
        limit = min(in_f, out_f) if max_rank is None else max_rank
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise LeanformerError(f"{self.method}: rank must be a positive integer, got {self.rank!r}")
        if self.rank > limit:
            raise LeanformerError(
                f"{self.method}: rank {self.rank} is larger than layer {name} allows "
                f"({out_f}×{in_f}: at most {limit})")


class AdapterModule(nn.Module):
    """ΔW·x for one Linear (scaling included) and ΔW itself, shaped like base.weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


@register_wrapper_type
class AdaptedLinear(nn.Module):
    """A frozen Linear-like layer (nn.Linear, Conv1D, a quantized layer) plus named adapters; at most
    one active, at most one merged into W. Adapters work on the (out, in) weight whatever the base's
    storage: merging into a Conv1D adds ΔWᵀ to its (in, out) weight."""

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
        return linear_shape(self.base_layer)[0]

    @property
    def out_features(self) -> int:
        return linear_shape(self.base_layer)[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.active is None or self.merged is not None or self.active not in self.adapters:
            return y
        return y + self.adapters[self.active](x)

    @torch.no_grad()
    def merge(self, name: str) -> None:
        if self.merged is not None:
            raise LeanformerError(f"adapter {self.merged!r} is already merged; unmerge it first")
        if not isinstance(getattr(self.base_layer, "weight", None), nn.Parameter):
            raise LeanformerError(f"cannot merge into a {type(self.base_layer).__name__} (its weight is not stored "
                                  "densely); keep the adapter unmerged")
        w = dense_weight(self.base_layer)  # a view: (out, in) even for a Conv1D's (in, out) storage
        w += self.adapters[name].delta_weight().to(w.dtype)
        self.merged = name

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged is None:
            return
        w = dense_weight(self.base_layer)
        w -= self.adapters[self.merged].delta_weight().to(w.dtype)
        self.merged = None


# ---------------------------------------------------------------------------------------------
# The verb


def adapt(model: nn.Module, config: AdapterConfig, name: str = "default", *, layers: list[str] | None = None) -> nn.Module:
    """Inject `config`'s adapter (named `name`) into the targeted Linear layers of `model`, in place.

    All base weights are frozen; the adapter's parameters and `config.modules_to_save` train.
    Adding a second name to an adapted model keeps the first (switch with `set_adapter`).
    `config.targets=None` resolves to the architecture's default (adapter_targets), which the
    recorded config then holds.
    """
    registry = adapter_configs(model)
    if name in registry:
        raise LeanformerError(f"adapter {name!r} already exists on this model; adapters: {list(registry)}")
    if any(isinstance(m, AdaptedLinear) and m.merged for m in model.modules()):
        raise LeanformerError("an adapter is merged into this model; unmerge(model) before adding another")
    if config.targets is None and layers is None and not hasattr(config, "default_layers"):
        from ..architectures import adapter_targets

        config = dataclasses.replace(config, targets=adapter_targets(model))
    if layers is not None:
        chosen = select_linear(model, layers)
    elif config.targets is None and hasattr(config, "default_layers"):  # a method's own default (SparseGrad: the MLP)
        chosen = config.default_layers(model)
    else:
        chosen = select_linear(model, config.targets, config.filter_fn)
    if hasattr(config, "prepare"):
        config.prepare(model)
    built = []
    for n in chosen:  # build all first, so a bad rank for one layer leaves the model untouched
        module = model.get_submodule(n)
        base = module.base_layer if isinstance(module, AdaptedLinear) else module
        built.append((n, module, config.build(base, n)))
    record_base(model)
    for n, module, adapter in built:
        if not isinstance(module, AdaptedLinear):
            wrapper = AdaptedLinear(module).train(module.training)
            set_module(model, n, wrapper)
            module = wrapper
        adapter.to(device=next(iter(module.base_layer.state_dict().values())).device)
        adapter.train(module.base_layer.training)  # new modules start in train mode; follow the model
        module.adapters[name] = adapter
    push(model, Applied("adapt", config, {"name": name, "layers": chosen}))
    if hasattr(config, "on_adapt"):
        config.on_adapt(model, name, [a for _, _, a in built])
    set_adapter(model, name)
    return model


def adapted_layers(model: nn.Module) -> Iterator[tuple[str, AdaptedLinear]]:
    for n, m in model.named_modules():
        if isinstance(m, AdaptedLinear):
            yield n, m


def adapter_configs(model: nn.Module) -> dict[str, AdapterConfig]:
    """name → config of every adapter on the model, in the order they were added."""
    return {e.state["name"]: e.config for e in applied(model) if e.transform == "adapt"}


def _require(model: nn.Module, name: str | None = None) -> dict:
    registry = adapter_configs(model)
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


def _find_modules(model: nn.Module, suffix: str) -> Iterator[nn.Parameter]:
    found = False
    for n, m in model.named_modules():
        if n == suffix or n.endswith("." + suffix):
            found = True
            yield from m.parameters()
    if not found:
        raise LeanformerError(f"modules_to_save entry {suffix!r} matches no module of {type(model).__name__}")


def active_adapter(model: nn.Module) -> str | None:
    return next((layer.active for _, layer in adapted_layers(model)), None)


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
    for entry in applied(model):
        if entry.transform == "adapt":
            remove(model, entry)
    return model


METHODS: dict[str, type[AdapterConfig]] = {}


def register(cls: type[AdapterConfig]) -> type[AdapterConfig]:
    METHODS[cls.method] = cls
    return cls


def config_from_dict(d: dict) -> AdapterConfig:
    d = dict(d)
    d = {k: tuple(v) if isinstance(v, list) and k.endswith("_shape") else v for k, v in d.items()}
    method = d.pop("method", None)
    if method not in METHODS:
        raise LeanformerError(f"unknown adapter method {method!r}; known: {sorted(METHODS)}")
    cls = METHODS[method]
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


def replay(model: nn.Module, config: dict, state: dict) -> None:
    """Re-add a recorded adapter (its tensors come from the state dict load that follows)."""
    adapt(model, config_from_dict(config), name=state["name"], layers=state["layers"])

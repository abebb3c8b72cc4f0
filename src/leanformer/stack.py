"""The one record of what was done to a model: the transforms applied to it, in order.

Every transform verb (`prune_layers`, `quantize`, `adapt`) appends an `Applied` entry to
`model.leanformer_stack` and reads nothing else off the model; `lf.save` writes the list (with the
base it started from) into leanformer.json and `lf.load` replays it. The first entry also records
the base: its class, its config as it was before any transform, and where it came from.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from torch import nn

STACK_ATTR = "leanformer_stack"
BASE_ATTR = "leanformer_base"


@dataclass
class Applied:
    """One applied transform. `config` is the user's config object (it has `to_dict`) or a plain dict;
    `state` is what replaying needs besides the config (layer names, headers, positions), JSON-able."""
    transform: str
    config: Any
    state: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        cfg = self.config.to_dict() if hasattr(self.config, "to_dict") else self.config
        return {"transform": self.transform, "config": cfg, "state": self.state}


def applied(model: nn.Module) -> list[Applied]:
    return list(getattr(model, STACK_ATTR, None) or [])


def push(model: nn.Module, entry: Applied) -> Applied:
    if not getattr(model, STACK_ATTR, None):
        record_base(model)
        setattr(model, STACK_ATTR, [])
    getattr(model, STACK_ATTR).append(entry)
    return entry


def remove(model: nn.Module, entry: Applied) -> None:
    stack = getattr(model, STACK_ATTR, None) or []
    setattr(model, STACK_ATTR, [e for e in stack if e is not entry])


def describe_base(model: nn.Module) -> dict:
    """The model as a base: its class, its config as it is now, and where it came from."""
    config = getattr(model, "config", None)
    return {"model_class": type(model).__name__, "name_or_path": str(getattr(model, "name_or_path", "") or ""),
            "config": copy.deepcopy(config.to_dict()) if config is not None else None}


def record_base(model: nn.Module) -> dict:
    """What the base looked like before the first transform (kept once; later calls return it)."""
    if getattr(model, BASE_ATTR, None) is None:
        setattr(model, BASE_ATTR, describe_base(model))
    return getattr(model, BASE_ATTR)


def base_of(model: nn.Module) -> dict:
    """The recorded base, or the model itself when nothing was applied yet (nothing is stored)."""
    return getattr(model, BASE_ATTR, None) or describe_base(model)


def set_base(model: nn.Module, info: dict) -> None:
    """Adopt a recorded base (when a saved stack is replayed onto a freshly built model)."""
    setattr(model, BASE_ATTR, copy.deepcopy(info))

"""What every config dataclass shares: one verb over a config object (torchao's `quantize_(model,
config)` shape), with keyword overrides so `lf.inspect(model, tok, texts, tokens=4096)` still works.

Each field documents itself once, in `field(metadata={"help": ...})` (the convention of
transformers' HfArgumentParser); the command line builds its flags from those fields
(leanformer.cli._config_args). Metadata keys read there: "help", "choices", "flag" (a flag name
other than --field-name), "metavar", and "cli": False for fields that are code, not data.
"""
from __future__ import annotations

import dataclasses
import difflib
from typing import Any, TypeVar

from .errors import LeanformerError

C = TypeVar("C")


def with_overrides(cls: type[C], config: C | None, overrides: dict[str, Any],
                   renamed: dict[str, str] | None = None) -> C:
    """`config` (default: cls()) with the keyword `overrides` applied; `renamed` maps old keyword
    names to fields (e.g. max_length → max_seq_length). Unknown keywords name the nearest fields."""
    if config is not None and not isinstance(config, cls):
        raise LeanformerError(f"expected a {cls.__name__}, got {type(config).__name__}")
    overrides = {(renamed or {}).get(k, k): v for k, v in overrides.items()}
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = [k for k in overrides if k not in names]
    if unknown:
        near = sorted({m for k in unknown for m in difflib.get_close_matches(k, names, n=2)})
        raise LeanformerError(f"unknown {cls.__name__} field(s) {', '.join(unknown)}"
                              + (f"; did you mean {', '.join(near)}?" if near else "")
                              + f" Fields: {', '.join(names)}")
    return dataclasses.replace(config, **overrides) if config is not None else cls(**overrides)


def check_positive(config, *names: str) -> None:
    """Raise '<field> must be positive, got <value>' for the first named field that is not > 0."""
    for name in names:
        value = getattr(config, name)
        if value is not None and not value > 0:
            raise LeanformerError(f"{name} must be positive, got {value!r}")

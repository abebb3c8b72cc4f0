"""Command-line flags generated from config dataclasses, the convention of transformers'
HfArgumentParser: one flag per field (`max_seq_length` → `--max-seq-length`), its help read from
the field's metadata["help"], so each option is documented once, next to the field.

A small helper instead of HfArgumentParser itself, because commands need what it cannot express:
one flag over several configs with each config's own default (compress's `--group-size`), the
`targets` union (suffixes / one regex / all-linear), optional numbers that accept "none", and
subcommand parsers. Every flag defaults to "not given" (argparse.SUPPRESS), so the dataclass
stays the one place that holds defaults and checks values; the help shows those defaults.
"""
from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import types
import typing

from ..errors import LeanformerError
from ..targets import Targets

_NO_DEFAULT = object()


def cli_fields(cls) -> list[dataclasses.Field]:
    """The fields of `cls` that are command-line flags (metadata "cli": False marks code, not data)."""
    return [f for f in dataclasses.fields(cls) if f.init and f.metadata.get("cli", True)]


def flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def parse_targets(values: list[str]) -> Targets:
    """['all-linear'] → 'all-linear'; one value with regex syntax → that regex; else name suffixes."""
    if len(values) == 1 and (values[0] == "all-linear" or re.search(r"[\\^$*+?()\[\]|]", values[0])):
        return values[0]
    return list(values)


def _optional(kind):
    def parse(text: str):
        return None if text.lower() == "none" else kind(text)
    parse.__name__ = kind.__name__  # argparse names the type in "invalid int value" errors
    return parse


def _argparse_kwargs(hint, f: dataclasses.Field) -> dict:
    args = typing.get_args(hint)
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args
    inner = next((a for a in args if a is not type(None)), hint) if optional else hint
    if hint == Targets:
        return {"nargs": "+", "metavar": "NAME", "type": str}
    if inner is bool:
        return {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(inner) is list:
        return {"nargs": "+", "type": typing.get_args(inner)[0]}
    if inner not in (int, float, str):
        raise TypeError(f"field {f.name}: no command-line form for type {hint}")
    kwargs = {"type": _optional(inner) if optional else inner}
    if "choices" in f.metadata:
        kwargs["choices"] = list(f.metadata["choices"])
    if "metavar" in f.metadata:
        kwargs["metavar"] = f.metadata["metavar"]
    return kwargs


def _show(value) -> str:
    return "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def add_config_arguments(parser, *classes, labels: dict | None = None) -> None:
    """Add a flag for every command-line field of `classes` (their union, first-seen order). Fields
    not in every class go in an argument group per subset, e.g. "kashin only"."""
    labels = labels or {}
    union: dict[str, list[tuple[type, dataclasses.Field]]] = {}
    for cls in classes:
        for f in cli_fields(cls):
            union.setdefault(f.name, []).append((cls, f))
    groups: dict[str, object] = {}
    for name, owners in union.items():
        cls, f = owners[0]
        if "help" not in f.metadata:
            raise TypeError(f"{cls.__name__}.{name} has no metadata help")
        kwargs = _argparse_kwargs(typing.get_type_hints(cls)[name], f)
        defaults = {c: (fl.default if fl.default is not dataclasses.MISSING else
                        fl.default_factory() if fl.default_factory is not dataclasses.MISSING else _NO_DEFAULT)
                    for c, fl in owners}
        help_text = f.metadata["help"]
        if _NO_DEFAULT in defaults.values():
            kwargs["required"] = True
        elif len({repr(d) for d in defaults.values()}) > 1:
            help_text += " (default: " + ", ".join(f"{labels.get(c, c.__name__)} {_show(d)}"
                                                   for c, d in defaults.items()) + ")"
        elif next(iter(defaults.values())) is not None:
            help_text += f" (default: {_show(next(iter(defaults.values())))})"
        target = parser
        if len(owners) < len(classes):
            title = ", ".join(labels.get(c, c.__name__) for c, _ in owners) + " only"
            if title not in groups:
                groups[title] = parser.add_argument_group(title)
            target = groups[title]
        target.add_argument(flag_name(f), dest=name, default=argparse.SUPPRESS,
                            help=help_text.replace("%", "%%"), **kwargs)


def given(args: argparse.Namespace, cls) -> dict:
    """{field: value} of the flags of `cls` the user gave (absent flags keep the dataclass default)."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in cli_fields(cls):
        if hasattr(args, f.name):
            value = getattr(args, f.name)
            out[f.name] = parse_targets(value) if hints[f.name] == Targets and value is not None else value
    return out


def config_from_args(cls, args: argparse.Namespace, **extra):
    """cls(**given flags, **extra). A config's own check that names a field ("tokens must be
    positive") is reported with the flag ("--tokens must be positive")."""
    try:
        return cls(**given(args, cls), **extra)
    except LeanformerError as e:
        message = str(e)
        for f in cli_fields(cls):
            if message.startswith(f.name + " "):
                raise LeanformerError(flag_name(f) + message[len(f.name):]) from e
        raise


class _DeprecatedAlias(argparse.Action):
    def __init__(self, option_strings, dest, new: str = "", **kwargs):
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"warning: {option_string} is deprecated; use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_deprecated_alias(parser, old: str, new: str, dest: str, **kwargs) -> None:
    """`old` still works (with a warning naming `new`) but is left out of --help."""
    parser.add_argument(old, dest=dest, action=_DeprecatedAlias, new=new, default=argparse.SUPPRESS,
                        help=argparse.SUPPRESS, **kwargs)

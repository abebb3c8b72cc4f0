"""`leanformer` command line: each module in this package that defines COMMAND is a subcommand.

A subcommand module defines COMMAND (its name), HELP (one line), add_arguments(parser) and
run(args) -> int. The CLI stays thin: parse, call the library, print. Flags that set a config
come from the config dataclass's fields (see _config_args); modules import those dataclasses at
the top and keep the heavy imports (model loading, training, plotting) inside run(), so that
`leanformer --help` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from ..errors import LeanformerError


def _commands():
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(module, "COMMAND"):
            yield module


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; with `command`, only that subcommand's flags are built (some cost imports:
    finetune's come from transformers.TrainingArguments), the others list their one-line help."""
    parser = argparse.ArgumentParser(prog="leanformer", description=__import__("leanformer").__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in _commands():
        p = sub.add_parser(module.COMMAND, help=module.HELP, description=module.HELP)
        if command is None or command == module.COMMAND:
            module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), "")
    args = build_parser(command).parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except LeanformerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

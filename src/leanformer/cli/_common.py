"""Argument groups shared by subcommands: the same flag names on every command (HF-style names
where they exist: --max-seq-length, --batch-size, --seed, --overwrite)."""
from __future__ import annotations

import torch

from ..errors import LeanformerError


def add_device(parser) -> None:
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run (default: cpu)")


def add_out(parser, required: bool = True, default: str | None = None) -> None:
    parser.add_argument("--out", required=required, default=default, metavar="DIR", help="output directory")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out directory whole")


def add_text_source(parser, purpose: str = "", default: str | None = "the built-in corpus") -> None:
    parser.add_argument("--text", nargs="+", metavar="PATH",
                        help=f"plain text file(s){purpose}" + (f" (default: {default})" if default else ""))
    parser.add_argument("--dataset", metavar="NAME", help="Hugging Face datasets name: path[:config][@split]")


def check_device(device: str) -> str:
    if device == "cuda" and not torch.cuda.is_available():
        raise LeanformerError("--device cuda requested but no CUDA device is available; use --device cpu")
    return device

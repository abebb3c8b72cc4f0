"""Argument groups shared by subcommands (HF-style names where they exist)."""
from __future__ import annotations


def add_device(parser) -> None:
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run (default cpu)")


def add_out(parser, required: bool = True, default: str | None = None) -> None:
    parser.add_argument("--out", required=required, default=default, metavar="DIR", help="output directory")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out directory whole")


def add_text_source(parser) -> None:
    parser.add_argument("--text", nargs="+", metavar="PATH", help="plain text file(s)")
    parser.add_argument("--dataset", metavar="NAME", help="Hugging Face datasets name: path[:config][@split]")


def check_device(device: str) -> str:
    import torch

    from ..errors import LeanformerError

    if device == "cuda" and not torch.cuda.is_available():
        raise LeanformerError("--device cuda requested but no CUDA device is available; use --device cpu")
    return device

"""leanformer inspect [MODEL] — layer geometry of any HF model: table, metrics.json, plots, report.html."""
from __future__ import annotations

import time
from pathlib import Path

from ._common import add_device, add_out, add_text_source, check_device

COMMAND = "inspect"
HELP = "layer geometry (linearity, anisotropy, intrinsic dimension, …) of a model on text"


def add_arguments(p) -> None:
    p.add_argument("model", nargs="?", default="minilm", metavar="MODEL",
                   help="alias (minilm, stories260k), HF directory or hub id (default: minilm)")
    add_text_source(p)
    p.add_argument("--tokens", type=int, default=16384, help="number of tokens to profile (default 16384)")
    p.add_argument("--max-length", type=int, default=128, help="tokens per sequence (default 128)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--sample-size", type=int, default=4096, help="tokens sampled for intrinsic dimension")
    p.add_argument("--seed", type=int, default=0)
    add_out(p, required=False)
    add_device(p)


def run(args) -> int:
    from ..text import get_texts
    from ..errors import LeanformerError
    from ..inspection import inspect
    from ..files import output_dir, save_json
    from ..saving import load
    from ..report import plot_profile, write_report

    if args.tokens <= 0:
        raise LeanformerError(f"--tokens must be positive, got {args.tokens}")
    device = check_device(args.device)
    out = args.out or f"leanformer-inspect/{Path(str(args.model)).name}-{time.strftime('%Y%m%d-%H%M%S')}"
    with output_dir(out, overwrite=args.overwrite) as staging:  # checked before any slow work
        texts = get_texts(args.text, args.dataset)
        model, tokenizer = load(args.model, device=device)
        profile = inspect(model, tokenizer, texts, tokens=args.tokens, max_length=args.max_length,
                          batch_size=args.batch_size, seed=args.seed, sample_size=args.sample_size)
        print(profile.table())
        save_json(staging / "metrics.json", profile.to_json())
        plots = plot_profile(profile, staging)
        write_report(profile, plots, staging / "report.html")
    print(f"\nwrote {Path(out) / 'metrics.json'}, {len(plots)} plots and {Path(out) / 'report.html'}")
    return 0

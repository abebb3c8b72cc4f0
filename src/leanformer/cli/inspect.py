"""leanformer inspect [MODEL] — layer geometry of any HF model: table, metrics.json, plots, report.html."""
from __future__ import annotations

import time
from pathlib import Path

from ..inspection import InspectConfig
from ._common import add_device, add_out, add_text_source, check_device
from ._config_args import add_config_arguments, add_deprecated_alias, config_from_args

COMMAND = "inspect"
HELP = "layer geometry (linearity, anisotropy, intrinsic dimension, …) of a model on text"


def add_arguments(p) -> None:
    p.add_argument("model", nargs="?", default="minilm", metavar="MODEL",
                   help="alias (minilm, stories260k), HF directory or hub id (default: minilm)")
    add_text_source(p)
    add_config_arguments(p, InspectConfig)
    add_deprecated_alias(p, "--max-length", "--max-seq-length", dest="max_seq_length", type=int)
    add_out(p, required=False)
    add_device(p)


def run(args) -> int:
    from ..files import output_dir, save_json
    from ..inspection import inspect
    from ..report import plot_profile, write_report
    from ..saving import load
    from ..text import get_texts

    config = config_from_args(InspectConfig, args)  # bad values fail before any slow work
    device = check_device(args.device)
    out = args.out or f"leanformer-inspect/{Path(str(args.model)).name}-{time.strftime('%Y%m%d-%H%M%S')}"
    with output_dir(out, overwrite=args.overwrite) as staging:  # checked before any slow work
        texts = get_texts(args.text, args.dataset)
        model, tokenizer = load(args.model, device=device)
        profile = inspect(model, tokenizer, texts, config)
        print(profile.table())
        print("\npruning candidates (prune --layers 1 --by C removes the first): " + "; ".join(
            f"{by}: " + ", ".join(f"block {c['block']} ({c['value']:.4f})" for c in ranked)
            for by, ranked in profile.pruning_candidates().items()))
        save_json(staging / "metrics.json", profile.to_json())
        plots = plot_profile(profile, staging)
        write_report(profile, plots, staging / "report.html")
    print(f"\nwrote {Path(out) / 'metrics.json'}, {len(plots)} plots and {Path(out) / 'report.html'}")
    return 0

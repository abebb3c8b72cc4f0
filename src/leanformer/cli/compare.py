"""leanformer compare RUN_A RUN_B [...] --out DIR — inspect profiles side by side: overlaid plots,
per-layer differences and a "what changed" table (see leanformer.comparison)."""
from __future__ import annotations

from pathlib import Path

from ..inspection import InspectConfig
from ._common import add_device, add_out, add_text_source, check_device
from ._config_args import add_config_arguments, config_from_args

COMMAND = "compare"
HELP = "compare the layer geometry of several runs: inspect output directories or models (base vs transformed)"


def add_arguments(p) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN",
                   help="an inspect output directory (its metrics.json is used as is) or a model (alias, HF directory, "
                        "a directory saved by leanformer, hub id: inspected here on the same text); the first is the "
                        "baseline")
    p.add_argument("--labels", nargs="+", metavar="NAME", help="one name per run (default: the directory names)")
    p.add_argument("--force", action="store_true",
                   help="compare runs that measured different text, token counts or samples (noted in the report)")
    add_text_source(p, " to inspect model runs on")
    add_config_arguments(p, InspectConfig)
    add_out(p)
    add_device(p)


def run(args) -> int:
    from ..comparison import compare
    from ..files import output_dir, save_json
    from ..report import plot_comparison, write_comparison_report
    from ..text import get_texts

    config = config_from_args(InspectConfig, args)  # bad values fail before any slow work
    device = check_device(args.device)
    with output_dir(args.out, overwrite=args.overwrite) as staging:
        texts = get_texts(args.text, args.dataset)
        comparison = compare(args.runs, texts, config, labels=args.labels, force=args.force, device=device)
        for r in comparison.runs:
            if r.kind == "model":  # reusable as an inspect output directory
                save_json(staging / "profiles" / r.label / "metrics.json", r.profile.to_json())
        save_json(staging / "compare.json", comparison.to_json())
        plots = plot_comparison(comparison, staging)
        write_comparison_report(comparison, plots, staging / "report.html")
    for row in comparison.changes():
        print(f"{row['what']:>40}  " + "  |  ".join(row["cells"]))
    for w in comparison.warnings:
        print(f"warning: {w}")
    print(f"\nwrote {Path(args.out) / 'compare.json'}, {len(plots)} plots and {Path(args.out) / 'report.html'}")
    return 0

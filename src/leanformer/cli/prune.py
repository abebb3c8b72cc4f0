"""`leanformer prune MODEL --layers N --by CRITERION --replace none|linear --out DIR`."""
from __future__ import annotations

from ._common import add_device, add_out, check_device

COMMAND = "prune"
HELP = "remove (or linearly replace) a run of N blocks chosen by linearity, block influence, angular distance or index"


def add_arguments(parser) -> None:
    from ..compress.prune import CRITERIA, REPLACEMENTS

    parser.add_argument("model", metavar="MODEL", help="alias (minilm, stories260k), model directory or hub id")
    parser.add_argument("--layers", type=int, required=True, metavar="N", help="number of consecutive blocks to remove")
    parser.add_argument("--by", default="linearity", choices=CRITERIA, help="how to pick the run (default linearity)")
    parser.add_argument("--replace", default="none", choices=REPLACEMENTS,
                        help="none = drop the blocks; linear = replace them by a fitted affine map")
    parser.add_argument("--start", type=int, default=None, help="with --by index: first block removed "
                        "(default: the N blocks before the last)")
    parser.add_argument("--calibration", nargs="+", metavar="PATH",
                        help="calibration text file(s) (default: the built-in corpus)")
    parser.add_argument("--tokens", type=int, default=8192, help="calibration tokens (default 8192)")
    parser.add_argument("--max-seq-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    add_out(parser)
    add_device(parser)


def run(args) -> int:
    from ..compress.prune import prune_layers, save_pruned
    from ..data import get_texts
    from ..models import load

    model, tok = load(args.model, device=check_device(args.device))
    needs_text = args.by != "index" or args.replace == "linear"
    texts = get_texts(args.calibration) if needs_text else None
    result = prune_layers(model, args.layers, by=args.by, replace=args.replace, tokenizer=tok, texts=texts,
                          start=args.start, tokens=args.tokens, max_length=args.max_seq_length,
                          batch_size=args.batch_size)
    out = save_pruned(model, tok, args.out, overwrite=args.overwrite, extra={"source": str(args.model)})
    if result.scores:
        print(f"{'start':>5}  " + "  ".join(f"{k:>15}" for k in result.scores))
        for s in range(len(next(iter(result.scores.values())))):
            mark = " <" if s == result.start else ""
            print(f"{s:>5}  " + "  ".join(f"{v[s]:>15.4f}" for v in result.scores.values()) + mark)
    what = "replaced by a linear map" if args.replace == "linear" else "removed"
    print(f"blocks {result.removed} {what}: {result.n_layers_before} → {result.n_layers_after} layers; wrote {out}")
    return 0

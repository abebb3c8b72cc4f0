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
    parser.add_argument("--heal-steps", type=int, default=0,
                        help="then heal with a short LoRA fine-tune of this many steps on the calibration text "
                             "(causal LMs: next-token loss; encoders: distil the unpruned model's last hidden state)")
    parser.add_argument("--heal-rank", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="healing learning rate")
    parser.add_argument("--seed", type=int, default=0)
    add_out(parser)
    add_device(parser)


def run(args) -> int:
    from ..compress.prune import prune_layers
    from ..saving import save
    from ..text import get_texts
    from ..models import is_causal_lm
    from ..saving import load

    model, tok = load(args.model, device=check_device(args.device))
    import copy

    from ..compress.prune import heal

    needs_text = args.by != "index" or args.replace == "linear" or args.heal_steps > 0
    texts = get_texts(args.calibration) if needs_text else None
    teacher = copy.deepcopy(model) if args.heal_steps > 0 and not is_causal_lm(model) else None
    result = prune_layers(model, args.layers, by=args.by, replace=args.replace, tokenizer=tok, texts=texts,
                          start=args.start, tokens=args.tokens, max_length=args.max_seq_length,
                          batch_size=args.batch_size)
    healed = {}
    if args.heal_steps > 0:
        healed = heal(model, tok, texts, steps=args.heal_steps, rank=args.heal_rank, learning_rate=args.learning_rate,
                      batch_size=args.batch_size, max_length=args.max_seq_length, teacher=teacher, seed=args.seed)
        print(f"healed {args.heal_steps} steps (LoRA rank {args.heal_rank}, merged): "
              f"loss {healed['heal_loss_first']:.4f} → {healed['heal_loss_last']:.4f}")
    out = save(model, tok, args.out, overwrite=args.overwrite)
    if result.scores:
        print(f"{'start':>5}  " + "  ".join(f"{k:>15}" for k in result.scores))
        for s in range(len(next(iter(result.scores.values())))):
            mark = " <" if s == result.start else ""
            print(f"{s:>5}  " + "  ".join(f"{v[s]:>15.4f}" for v in result.scores.values()) + mark)
    what = "replaced by a linear map" if args.replace == "linear" else "removed"
    print(f"blocks {result.removed} {what}: {result.n_layers_before} → {result.n_layers_after} layers; wrote {out}")
    return 0

"""`leanformer prune MODEL --layers N --by CRITERION --replace none|linear --out DIR`."""
from __future__ import annotations

from ..compress.prune import PruneConfig
from ._common import add_device, add_out, add_text_source, check_device
from ._config_args import add_config_arguments, add_deprecated_alias, config_from_args

COMMAND = "prune"
HELP = "remove (or linearly replace) a run of N blocks chosen by linearity, block influence, angular distance or index"


def add_arguments(parser) -> None:
    parser.add_argument("model", metavar="MODEL", help="alias (minilm, stories260k), model directory or hub id")
    add_config_arguments(parser, PruneConfig)
    add_text_source(parser, " for calibration and healing")
    add_deprecated_alias(parser, "--calibration", "--text", dest="text", nargs="+", metavar="PATH")
    parser.add_argument("--heal-steps", type=int, default=0,
                        help="then heal with a short LoRA fine-tune of this many steps on the calibration text "
                             "(causal LMs: next-token loss; encoders: distil the unpruned model's last hidden state)")
    parser.add_argument("--heal-rank", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="healing learning rate")
    parser.add_argument("--seed", type=int, default=0, help="healing seed (default: 0)")
    add_out(parser)
    add_device(parser)


def run(args) -> int:
    import copy

    from ..compress.prune import prune_layers
    from ..train.heal import heal
    from ..models import is_causal_lm
    from ..saving import load, save
    from ..text import get_texts

    config = config_from_args(PruneConfig, args)  # bad values fail before the model loads
    model, tok = load(args.model, device=check_device(args.device))
    needs_text = config.by != "index" or config.replace == "linear" or args.heal_steps > 0
    texts = get_texts(args.text, args.dataset) if needs_text else None
    teacher = copy.deepcopy(model) if args.heal_steps > 0 and not is_causal_lm(model) else None
    result = prune_layers(model, config, tokenizer=tok, texts=texts)
    healed = {}
    if args.heal_steps > 0:
        healed = heal(model, tok, texts, steps=args.heal_steps, rank=args.heal_rank, learning_rate=args.learning_rate,
                      batch_size=config.batch_size, max_length=config.max_seq_length, teacher=teacher, seed=args.seed)
        print(f"healed {args.heal_steps} steps (LoRA rank {args.heal_rank}, merged): "
              f"loss {healed['heal_loss_first']:.4f} → {healed['heal_loss_last']:.4f}")
    out = save(model, tok, args.out, overwrite=args.overwrite)
    if result.scores:
        print(f"{'start':>5}  " + "  ".join(f"{k:>15}" for k in result.scores))
        for s in range(len(next(iter(result.scores.values())))):
            mark = " <" if s == result.start else ""
            print(f"{s:>5}  " + "  ".join(f"{v[s]:>15.4f}" for v in result.scores.values()) + mark)
    what = "replaced by a linear map" if config.replace == "linear" else "removed"
    print(f"blocks {result.removed} {what}: {result.n_layers_before} → {result.n_layers_after} layers; wrote {out}")
    return 0

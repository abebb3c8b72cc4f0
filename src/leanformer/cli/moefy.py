"""`leanformer moefy MODEL (--task T | --text PATH) --experts N --tau τ --rule dynk_max|dynk --out DIR`.

Splits every MLP into experts and trains a router per layer on calibration tokens (a task's training
split, or text), then saves the dynamic-k model with lf.save. Sweep τ afterwards with
`leanformer eval DIR --task T --tau-sweep`.
"""
from __future__ import annotations

from ..dynamic.moe import DSTI
from ._common import add_device, add_out, add_text_source, check_device
from ._config_args import add_config_arguments, config_from_args

COMMAND = "moefy"
HELP = "turn a model's MLPs into dynamic-k mixtures of experts with trained routers (D2DMoE / DSTI)"


def add_arguments(parser) -> None:
    parser.add_argument("model", metavar="MODEL", help="alias, model directory (e.g. a finetune --relu-mlp "
                                                      "--sparsity-reg hoyer output) or hub id")
    parser.add_argument("--task", help="calibrate on this task's training split (GLUE-format dir, 'TRAIN,DEV' pair, "
                                       "or HF dataset name)")
    add_text_source(parser, " to calibrate on", default=None)
    add_config_arguments(parser, DSTI)
    add_out(parser)
    add_device(parser)


def run(args) -> int:
    from ..errors import LeanformerError
    from ..dynamic.moe import moe_layers, moefy
    from ..saving import load, save
    from ..tasks import load_task
    from ..text import get_texts

    config = config_from_args(DSTI, args)  # bad values fail before the model loads
    if bool(args.task) == bool(args.text or args.dataset):
        raise LeanformerError("give exactly one of --task (its training split calibrates) or --text/--dataset")
    model, tokenizer = load(args.model, device=check_device(args.device))
    calibration = load_task(args.task) if args.task else get_texts(args.text, args.dataset)
    report = moefy(model, config, tokenizer=tokenizer, calibration=calibration)
    report = {"model": str(args.model), "config": config.to_dict(), **report}
    out = save(model, tokenizer, args.out, overwrite=args.overwrite, extra_json={"moefy.json": report})
    print(f"{'block':>5}  {'router MSE':>10}  {'experts/token at τ':>18}")
    for row in report["layers"]:
        print(f"{row['block']:>5}  {row['router_mse']:>10.4g}  {row['experts_per_token']:>18.2f}")
    experts = moe_layers(model)[0].experts
    print(f"{experts} experts per MLP, rule {config.rule}, τ = {config.tau}, routers trained on "
          f"{report['calibration_tokens']} tokens; wrote {out}")
    return 0

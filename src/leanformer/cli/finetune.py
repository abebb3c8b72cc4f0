"""leanformer finetune MODEL --task TASK --method lora|lora_xs|dylora|krona|full --out DIR

Sequence classification / regression with an adapter (or all weights), on accelerate. Writes the
adapter (or, for `full`, the whole model) and DIR/metrics.json. Checkpoints go to a hidden sibling
`.DIR.checkpoints/` while training; rerunning the same command after an interruption continues from
the last finished step, and the checkpoints are removed once DIR is written.
"""
from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

from ..errors import LeanformerError
from ._common import add_device, add_out, check_device

COMMAND = "finetune"
HELP = "fine-tune a model on a classification/regression task with LoRA, LoRA-XS, DyLoRA, KronA or fully"
METHODS = ("lora", "lora_xs", "dylora", "krona", "full")


def add_arguments(p) -> None:
    p.add_argument("model", help="alias (minilm), HF model directory, or hub id")
    p.add_argument("--task", required=True, help="GLUE-format dir, 'TRAIN,DEV' CSV/JSONL pair, or HF dataset name")
    p.add_argument("--method", default="lora", choices=METHODS)
    p.add_argument("--rank", type=int, default=8, help="adapter rank (dylora: the maximum rank)")
    p.add_argument("--alpha", type=float, help="scale: ΔW·alpha/rank (default 16); krona: ΔW = alpha·A⊗B (default 1)")
    p.add_argument("--targets", nargs="+", default=["query", "value"],
                   help="module-name suffixes, one regex, or all-linear (default: query value)")
    p.add_argument("--dropout", type=float, default=0.0, help="adapter input dropout")
    p.add_argument("--krona-a-shape", type=int, nargs=2, metavar=("A1", "A2"),
                   help="krona: shape of A (B follows); default near-square")
    p.add_argument("--krona-variant", default="linear", choices=["linear", "block", "block_res"])
    p.add_argument("--eval-ranks", type=int, nargs="+", help="dylora: also evaluate at these ranks")
    p.add_argument("--learning-rate", type=float, default=None, help="default 5e-4 for adapters, 5e-5 for full")
    p.add_argument("--head-learning-rate", type=float, help="separate lr for the classifier head")
    p.add_argument("--num-train-epochs", type=float, default=3.0)
    p.add_argument("--max-steps", type=int, help="train this many steps (overrides epochs)")
    p.add_argument("--per-device-train-batch-size", type=int, default=32)
    p.add_argument("--per-device-eval-batch-size", type=int, default=64)
    p.add_argument("--max-seq-length", type=int, default=128)
    p.add_argument("--max-train-samples", type=int, help="a fixed random sample of the training split")
    p.add_argument("--max-eval-samples", type=int)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup-ratio", type=float, default=0.06)
    p.add_argument("--save-steps", type=int, default=200, help="checkpoint every N steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    add_out(p)
    add_device(p)


def parse_targets(values: list[str]):
    """['all-linear'] → 'all-linear'; one value with regex syntax → that regex; else suffixes."""
    if len(values) == 1 and (values[0] == "all-linear" or re.search(r"[\\^$*+?()\[\]|]", values[0])):
        return values[0]
    return list(values)


def build_config(args, head: str):
    from ..adapters import DyLoRA, KronA, LoRA, LoRAXS

    common = dict(targets=parse_targets(args.targets), dropout=args.dropout, modules_to_save=[head])
    if args.method == "krona":
        return KronA(alpha=1.0 if args.alpha is None else args.alpha, variant=args.krona_variant,
                       a_shape=tuple(args.krona_a_shape) if args.krona_a_shape else None, **common)
    cls = {"lora": LoRA, "lora_xs": LoRAXS, "dylora": DyLoRA}[args.method]
    return cls(rank=args.rank, alpha=16.0 if args.alpha is None else args.alpha, **common)


def run(args) -> int:
    from ..adapters import base as A
    from ..tasks import load_task
    from ..evaluation import evaluate_task
    from ..saving import save
    from ..saving import load
    from ..train.loop import TrainConfig, train_classifier

    device = check_device(args.device)
    out = Path(args.out)
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:  # fail before the long part
        raise LeanformerError(f"--out {out} already exists and is not empty; choose a new directory or pass --overwrite")
    if args.eval_ranks and args.method != "dylora":
        raise LeanformerError("--eval-ranks applies to --method dylora only")
    task = load_task(args.task)
    model, tokenizer = load(args.model, head="sequence-classification", num_labels=task.num_labels, device=device)
    if task.label_names:
        model.config.id2label = dict(enumerate(task.label_names))
        model.config.label2id = {n: i for i, n in enumerate(task.label_names)}
    head = "classifier" if hasattr(model, "classifier") else "score"
    if args.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        A.adapt(model, build_config(args, head))
    if args.eval_ranks:
        bad = [r for r in args.eval_ranks if not 1 <= r <= args.rank]
        if bad:
            raise LeanformerError(f"--eval-ranks {bad} outside 1..{args.rank} (the trained --rank)")
    counts = A.trainable_parameters(model)
    print(f"{args.method}: trainable params {counts['trainable']:,} of {counts['total']:,} ({counts['percent']:.3f}%)")

    ckpt_dir = out.absolute().parent / f".{out.name}.checkpoints"
    cfg = TrainConfig(
        learning_rate=args.learning_rate or (5e-5 if args.method == "full" else 5e-4),
        head_learning_rate=args.head_learning_rate, num_train_epochs=args.num_train_epochs,
        max_steps=args.max_steps, per_device_train_batch_size=args.per_device_train_batch_size,
        per_device_eval_batch_size=args.per_device_eval_batch_size, max_seq_length=args.max_seq_length,
        max_train_samples=args.max_train_samples, max_eval_samples=args.max_eval_samples,
        weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio, seed=args.seed,
        checkpoint_dir=str(ckpt_dir), save_steps=args.save_steps, progress=not args.no_progress)
    started = time.perf_counter()
    metrics = train_classifier(model, tokenizer, task, cfg)
    result = {"model": str(args.model), "task": task.name, "method": args.method, **metrics}
    if args.method != "full":
        result.update(rank=None if args.method == "krona" else args.rank, targets=args.targets)
    if args.eval_ranks:
        per_rank = {}
        for r in args.eval_ranks:
            A.set_rank(model, r)
            per_rank[str(r)] = evaluate_task(model, tokenizer, task, "dev", args.per_device_eval_batch_size,
                                             args.max_seq_length, args.max_eval_samples)
        A.set_rank(model, args.rank)
        result["by_rank"] = per_rank
    result["wall_seconds"] = round(time.perf_counter() - started, 2)

    save(model, tokenizer, out, overwrite=args.overwrite, extra_json={"metrics.json": result})
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    for k, v in result.items():
        print(f"{k:>24}: {v:.4f}" if isinstance(v, float) else f"{k:>24}: {v}")
    print(f"wrote {out}")
    return 0

"""leanformer finetune MODEL --task TASK --method lora|lora_xs|dylora|krona|full --out DIR

Sequence classification / regression with an adapter (or all weights) on transformers.Trainer
(leanformer.train.finetune). The flags are leanformer's own (FinetuneArguments below) plus every
transformers.TrainingArguments field (--learning-rate, --num-train-epochs, --save-steps, --seed,
--gradient-accumulation-steps, --bf16, …), all parsed by HfArgumentParser from the dataclass fields,
each documented once in its field's metadata["help"]. It runs as several processes too:

    accelerate launch --num_processes N -m leanformer.cli finetune MODEL --task TASK --out DIR
    torchrun --nproc_per_node N -m leanformer.cli finetune MODEL --task TASK --out DIR

Writes the adapter (or, for full, the whole model) and DIR/metrics.json with lf.save. Trainer
checkpoints go to a hidden sibling `.DIR.checkpoints/` (or --output-dir) every --save-steps and on
SIGTERM / Ctrl-C; rerunning the same command continues from the newest one, and they are removed
once DIR is written.
"""
from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

from ..adapters import DyLoRA, KronA, LoRA, LoRAXS, set_rank, trainable_parameters
from ..errors import LeanformerError
from ..evaluation import evaluate_task
from ..models import classifier_head_name
from ..saving import load, save
from ..tasks import load_task
from ._common import check_device
from ._config_args import parse_targets

COMMAND = "finetune"
HELP = "fine-tune a model on a classification/regression task with LoRA, LoRA-XS, DyLoRA, KronA or fully"
METHODS = ("lora", "lora_xs", "dylora", "krona", "full")
# TrainingArguments defaults this command changes (the rest are transformers' own).
TRAINING_DEFAULTS = dict(learning_rate=None, per_device_train_batch_size=32, per_device_eval_batch_size=64,
                         warmup_steps=0.06, save_steps=200, save_total_limit=2, logging_steps=50, seed=0,
                         train_sampling_strategy="group_by_length")
LEARNING_RATE = {"full": 5e-5, "adapter": 5e-4}


@dataclass
class FinetuneArguments:
    """leanformer's own finetune options (the training loop's are TrainingArguments)."""
    _argument_group_name = "leanformer"

    task: str = field(metadata={"help": "GLUE-format dir, 'TRAIN,DEV' CSV/JSONL pair, or HF dataset name"})
    out: str = field(metadata={"help": "output directory: the adapter (or model) and metrics.json", "metavar": "DIR"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing --out directory whole"})
    method: str = field(default="lora", metadata={"help": "adapter method, or full fine-tuning", "choices": METHODS})
    rank: int = field(default=8, metadata={"help": "adapter rank (dylora: the maximum rank)"})
    alpha: float | None = field(default=None, metadata={
        "help": "scale: ΔW·alpha/rank (default 16); krona: ΔW = alpha·A⊗B (default 1)"})
    targets: list[str] = field(default_factory=lambda: ["query", "value"], metadata={
        "help": "module-name suffixes, one regex, or all-linear"})
    dropout: float = field(default=0.0, metadata={"help": "adapter input dropout"})
    krona_a_shape: list[int] | None = field(default=None, metadata={
        "help": "krona: shape of A, two numbers (B follows); default near-square", "metavar": "N"})
    krona_variant: str = field(default="linear", metadata={"help": "krona variant",
                                                           "choices": ["linear", "block", "block_res"]})
    eval_ranks: list[int] | None = field(default=None, metadata={"help": "dylora: also evaluate at these ranks"})
    max_seq_length: int = field(default=128, metadata={"help": "tokens per example (longer ones are truncated)"})
    max_train_samples: int | None = field(default=None, metadata={
        "help": "train on a fixed random sample of this many examples (the same for every --seed)"})
    max_eval_samples: int | None = field(default=None, metadata={"help": "evaluate on the first N dev examples"})
    head_learning_rate: float | None = field(default=None, metadata={
        "help": "a separate learning rate for the classifier head"})
    device: str = field(default="auto", metadata={
        "help": "auto: what Trainer picks (each process's GPU under torchrun / accelerate launch, else the CPU)",
        "choices": ["auto", "cpu", "cuda"]})


def add_arguments(p) -> None:
    # imported here (as in run): TrainingArguments imports peft and transformers' modelling stack,
    # seconds that only `leanformer finetune` should pay
    from transformers import HfArgumentParser, TrainingArguments

    p.add_argument("model", help="alias (minilm), HF model directory, or hub id")
    hf = HfArgumentParser((FinetuneArguments, TrainingArguments), add_help=False)
    hf.set_defaults(**TRAINING_DEFAULTS)
    for action in hf._actions:
        if action.dest == "learning_rate":
            action.help += " (default: 5e-4 for adapters, 5e-5 for full)"
    p._add_container_actions(hf)  # what argparse does with ArgumentParser(parents=[hf])


def _from_namespace(cls, args, **values):
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if f.init and hasattr(args, f.name)} | values)


def build_config(opts: FinetuneArguments, head: str):
    common = dict(targets=parse_targets(opts.targets), dropout=opts.dropout, modules_to_save=[head])
    if opts.method == "krona":
        if opts.krona_a_shape is not None and len(opts.krona_a_shape) != 2:
            raise LeanformerError(f"--krona-a-shape takes two numbers (rows, columns of A), got {opts.krona_a_shape}")
        return KronA(alpha=1.0 if opts.alpha is None else opts.alpha, variant=opts.krona_variant,
                     a_shape=tuple(opts.krona_a_shape) if opts.krona_a_shape else None, **common)
    cls = {"lora": LoRA, "lora_xs": LoRAXS, "dylora": DyLoRA}[opts.method]
    return cls(rank=opts.rank, alpha=16.0 if opts.alpha is None else opts.alpha, **common)


def run(args) -> int:
    from transformers import TrainingArguments, set_seed

    from ..train.callbacks import TrainingInterrupted
    from ..train.finetuning import finetune, last_checkpoint

    opts = _from_namespace(FinetuneArguments, args)
    out = Path(opts.out)
    if out.is_dir() and any(out.iterdir()) and not opts.overwrite:  # fail before the long part
        raise LeanformerError(f"--out {out} already exists and is not empty; choose a new directory or pass --overwrite")
    if opts.eval_ranks and opts.method != "dylora":
        raise LeanformerError("--eval-ranks applies to --method dylora only")
    if opts.eval_ranks and not all(1 <= r <= opts.rank for r in opts.eval_ranks):
        raise LeanformerError(f"--eval-ranks {opts.eval_ranks} outside 1..{opts.rank} (the trained --rank)")
    if opts.device != "auto":
        check_device(opts.device)
    checkpoints = out.absolute().parent / f".{out.name}.checkpoints"
    try:
        training = _from_namespace(
            TrainingArguments, args, output_dir=args.output_dir or str(checkpoints),
            learning_rate=(LEARNING_RATE["full" if opts.method == "full" else "adapter"] if args.learning_rate is None
                           else args.learning_rate),
            use_cpu=args.use_cpu or opts.device == "cpu")
    except ValueError as e:  # TrainingArguments' own checks
        raise LeanformerError(str(e)) from e
    main_process = training.process_index == 0

    task = load_task(opts.task)
    set_seed(training.seed)  # the head's and the adapter's initialisation follow --seed
    model, tokenizer = load(args.model, head="sequence-classification", num_labels=task.num_labels)
    if task.label_names:
        model.config.id2label = dict(enumerate(task.label_names))
        model.config.label2id = {n: i for i, n in enumerate(task.label_names)}
    method = "full" if opts.method == "full" else build_config(opts, classifier_head_name(model))
    resume = training.resume_from_checkpoint or last_checkpoint(training.output_dir)
    if resume and main_process:
        print(f"resuming from {resume}")
    started = time.perf_counter()
    try:
        metrics = finetune(model, tokenizer, task, training, method=method, max_seq_length=opts.max_seq_length,
                           max_train_samples=opts.max_train_samples, max_eval_samples=opts.max_eval_samples,
                           head_learning_rate=opts.head_learning_rate, resume_from_checkpoint=resume)
    except TrainingInterrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        return 130
    counts = trainable_parameters(model)
    result = {"model": str(args.model), "task": task.name, "method": opts.method, **metrics}
    if opts.method != "full":
        result.update(rank=None if opts.method == "krona" else opts.rank, targets=opts.targets)
    if opts.eval_ranks:
        per_rank = {}
        for r in opts.eval_ranks:
            set_rank(model, r)
            per_rank[str(r)] = evaluate_task(model, tokenizer, task, "dev", training.per_device_eval_batch_size,
                                             opts.max_seq_length, opts.max_eval_samples)
        set_rank(model, opts.rank)
        result["by_rank"] = per_rank
    result["wall_seconds"] = round(time.perf_counter() - started, 2)
    if not main_process:  # one process writes the result
        return 0
    save(model, tokenizer, out, overwrite=opts.overwrite, extra_json={"metrics.json": result})
    if not args.output_dir:
        shutil.rmtree(checkpoints, ignore_errors=True)
    print(f"{opts.method}: trainable params {counts['trainable']:,} of {counts['total']:,} ({counts['percent']:.3f}%)")
    for k, v in result.items():
        print(f"{k:>24}: {v:.4f}" if isinstance(v, float) else f"{k:>24}: {v}")
    print(f"wrote {out}")
    return 0

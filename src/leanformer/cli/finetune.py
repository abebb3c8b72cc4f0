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

from ..adapters import DyLoRA, KronA, LoRA, LoRAXS, MeProp, SparseGrad, set_rank, trainable_parameters
from ..errors import LeanformerError
from ..evaluation import evaluate_task
from ..models import classifier_head_name
from ..saving import load, save
from ..tasks import load_task
from ..train.lr_finder import RangeTest
from ._common import check_device
from ._config_args import parse_targets

COMMAND = "finetune"
HELP = ("fine-tune a model on a classification/regression task with LoRA, LoRA-XS, DyLoRA, KronA, SparseGrad, "
        "MeProp or fully")
METHODS = ("lora", "lora_xs", "dylora", "krona", "sparsegrad", "meprop", "full")
# TrainingArguments defaults this command changes (the rest are transformers' own).
# learning_rate, warmup_steps, weight_decay and lr_scheduler_type default to None here: unset, they
# come from the method's published recipe (leanformer.adapters.recipe).
RECIPE_FIELDS = ("learning_rate", "warmup_steps", "weight_decay", "lr_scheduler_type")
TRAINING_DEFAULTS = dict(per_device_train_batch_size=32, per_device_eval_batch_size=64, save_steps=200,
                         save_total_limit=2, logging_steps=10, seed=0, train_sampling_strategy="group_by_length",
                         **dict.fromkeys(RECIPE_FIELDS))
LEARNING_RATE = {"full": 5e-5, "adapter": 5e-4, "naggs": 5e-2}  # naggs: α of the paper's GLUE runs (μ = γ = 1)


@dataclass
class FinetuneArguments:
    """leanformer's own finetune options (the training loop's are TrainingArguments)."""
    _argument_group_name = "leanformer"

    task: str = field(metadata={"help": "GLUE-format dir, 'TRAIN,DEV' CSV/JSONL pair, or HF dataset name"})
    out: str = field(metadata={"help": "output directory: the adapter (or model) and metrics.json", "metavar": "DIR"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing --out directory whole"})
    method: str | None = field(default=None, metadata={
        "help": "adapter method, or full fine-tuning (default lora; with --early-exit: none, the backbone stays "
                "frozen; a method given trains it jointly with the exits)", "choices": METHODS})
    rank: int = field(default=8, metadata={"help": "adapter rank (dylora: the maximum rank)"})
    alpha: float | None = field(default=None, metadata={
        "help": "scale: ΔW·alpha/rank (default 16); krona: ΔW = alpha·A⊗B (default 1)"})
    targets: list[str] | None = field(default=None, metadata={
        "help": "module-name suffixes, one regex, or all-linear (default: the architecture's attention query "
                "and value projections, as peft: query value on BERT, q_proj v_proj on Llama, c_attn on GPT-2)"})
    dropout: float = field(default=0.0, metadata={"help": "adapter input dropout"})
    krona_a_shape: list[int] | None = field(default=None, metadata={
        "help": "krona: shape of A, two numbers (B follows); default near-square", "metavar": "N"})
    krona_variant: str = field(default="linear", metadata={"help": "krona variant",
                                                           "choices": ["linear", "block", "block_res"]})
    eval_ranks: list[int] | None = field(default=None, metadata={"help": "dylora: also evaluate at these ranks"})
    topk: int | None = field(default=None, metadata={
        "help": "sparsegrad / meprop: gradient entries kept per layer per step (default: a --rank LoRA's "
                "trainable-parameter count on that layer, rank·(in + out))"})
    randomized_backprop: float | None = field(default=None, metadata={
        "help": "save a sketch of RATIO of the token rows of each trainable Linear input for backward instead of "
                "the input (Bershatsky et al.); in (0, 1]", "metavar": "RATIO"})
    sketch: str = field(default="gaussian", metadata={"help": "randomized backprop's sketch",
                                                      "choices": ["gaussian", "rademacher", "dct"]})
    optimizer: str = field(default="adamw", metadata={
        "help": "adamw (TrainingArguments' --optim) or naggs (NAG-GS; --learning-rate is its α, default 5e-2)",
        "choices": ["adamw", "naggs"]})
    naggs_mu: float = field(default=1.0, metadata={"help": "NAG-GS μ"})
    naggs_gamma: float = field(default=1.0, metadata={"help": "NAG-GS initial γ"})
    linearity_reg: float = field(default=0.0, metadata={
        "help": "λ of the cosine regulariser λ·Σ(1 − cos(h_i, h_{i−1})) on the residual stream, added to the loss "
                "and logged", "metavar": "λ"})
    sparsity_reg: str | None = field(default=None, metadata={
        "help": "D2DMoE's sparsity phase before `leanformer moefy`: add w·(square Hoyer ‖a‖₁²/‖a‖₂², or L1) of the "
                "MLP activations to the loss, w warmed up linearly (Piórczyński et al. 2024, §3.1)",
        "choices": ["hoyer", "l1"]})
    sparsity_weight: float | None = field(default=None, metadata={
        "help": "w of --sparsity-reg (default: 1e-3 for hoyer, 1e-4 for l1, the paper's values)", "metavar": "W"})
    sparsity_warmup: float = field(default=0.5, metadata={
        "help": "fraction of the steps over which --sparsity-weight rises linearly from 0"})
    relu_mlp: bool = field(default=False, metadata={
        "help": "switch the MLP activations (GELU, SiLU) to ReLU before training: ReLU gives exact zeros, which "
                "a moefied model turns into skipped experts; GELU/SiLU almost never output 0"})
    early_exit: str | None = field(default=None, metadata={
        "help": "train internal classifiers after each block for early exit: ztw (Zero Time Waste: cascade + "
                "geometric ensemble, Wołczyk et al. 2021) or plain (independent); heads at --learning-rate "
                "(default 1e-3), then ztw's ensembles at --ensemble-learning-rate", "choices": ["ztw", "plain"]})
    exit_tau: float = field(default=0.9, metadata={
        "help": "--early-exit: the exit threshold saved with the model (eval --tau / --tau-sweep override it)",
        "metavar": "τ"})
    ensemble_learning_rate: float | None = field(default=None, metadata={
        "help": "--early-exit ztw: learning rate of the ensemble phase (default 1e-4, the authors')"})
    exit_pooling: str = field(default="mean", metadata={
        "help": "--early-exit: what each internal classifier reads: mean (of the unpadded tokens) or cls (the first "
                "token)", "choices": ["mean", "cls"]})
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
            action.type = _learning_rate
            action.metavar = "LR|auto"
            action.help = ("the adapter's learning rate (all weights' for full), or 'auto': a learning-rate range test "
                           "on training batches picks it (default: the method's published recipe)")
        elif action.dest in RECIPE_FIELDS:
            action.help = (action.help or "") + " (default: the method's recipe)"
    p._add_container_actions(hf)  # what argparse does with ArgumentParser(parents=[hf])


def _learning_rate(value: str):
    if value == "auto":
        return value
    try:
        return float(value)
    except ValueError:
        raise LeanformerError(f"--learning-rate takes a number or 'auto', got {value!r}") from None


def recipe_of(method: str):
    """The published recipe `method` trains with by default (None for methods without one)."""
    from ..adapters.recipe import FULL_FINETUNING

    if method == "full":
        return FULL_FINETUNING
    cls = {"lora": LoRA, "lora_xs": LoRAXS, "dylora": DyLoRA, "krona": KronA}.get(method)
    return getattr(cls, "recipe", None)


def _from_namespace(cls, args, **values):
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if f.init and hasattr(args, f.name)} | values)


def build_config(opts: FinetuneArguments, head: str, model=None):
    recipe = recipe_of(opts.method)
    targets = parse_targets(opts.targets) if opts.targets else None
    if targets is None and recipe is not None and model is not None:  # the recipe's roles on this architecture
        from ..architectures import adapter_targets

        targets = adapter_targets(model, roles=recipe.roles)
    if opts.alpha is None and recipe is not None and recipe.alpha is not None:
        opts.alpha = recipe.alpha
    common = dict(targets=targets, dropout=opts.dropout, modules_to_save=[head])
    if opts.method == "krona":
        if opts.krona_a_shape is not None and len(opts.krona_a_shape) != 2:
            raise LeanformerError(f"--krona-a-shape takes two numbers (rows, columns of A), got {opts.krona_a_shape}")
        return KronA(alpha=1.0 if opts.alpha is None else opts.alpha, variant=opts.krona_variant,
                     a_shape=tuple(opts.krona_a_shape) if opts.krona_a_shape else None, **common)
    if opts.method in ("sparsegrad", "meprop"):
        cls = SparseGrad if opts.method == "sparsegrad" else MeProp
        return cls(topk=opts.topk, budget_rank=None if opts.topk else opts.rank, **common)
    cls = {"lora": LoRA, "lora_xs": LoRAXS, "dylora": DyLoRA}[opts.method]
    return cls(rank=opts.rank, alpha=16.0 if opts.alpha is None else opts.alpha, **common)


def memory_options(opts: FinetuneArguments) -> dict:
    """finetune's keyword arguments for --optimizer, --randomized-backprop and --linearity-reg."""
    from ..train.randomized_backprop import RandomizedBackprop

    if opts.topk is not None and opts.method not in ("sparsegrad", "meprop"):
        raise LeanformerError(f"--topk applies to --method sparsegrad or meprop, not {opts.method}")
    return dict(optimizer=opts.optimizer, optimizer_options=dict(mu=opts.naggs_mu, gamma=opts.naggs_gamma)
                if opts.optimizer == "naggs" else None,
                randomized_backprop=None if opts.randomized_backprop is None
                else RandomizedBackprop(opts.randomized_backprop, opts.sketch),
                linearity_reg=opts.linearity_reg)


def sparsity_options(opts: FinetuneArguments) -> dict:
    """finetune's keyword arguments for --sparsity-reg, --sparsity-weight, --sparsity-warmup and --relu-mlp."""
    from ..train.regularizers import ActivationSparsity

    if opts.sparsity_reg is None and opts.sparsity_weight is not None:
        raise LeanformerError("--sparsity-weight needs --sparsity-reg hoyer|l1")
    reg = None
    if opts.sparsity_reg is not None:
        weight = opts.sparsity_weight if opts.sparsity_weight is not None else \
            {"hoyer": 1e-3, "l1": 1e-4}[opts.sparsity_reg]
        reg = ActivationSparsity(opts.sparsity_reg, weight, opts.sparsity_warmup)
    return dict(sparsity_reg=reg, relu_mlp=opts.relu_mlp)


def run(args) -> int:
    from transformers import TrainingArguments, set_seed

    from ..train.callbacks import TrainingInterrupted
    from ..train.finetuning import finetune, last_checkpoint

    opts = _from_namespace(FinetuneArguments, args)
    if opts.method is None and not opts.early_exit:
        opts.method = "lora"
    early_exit, heads_lr = None, None
    if opts.early_exit:  # checked before the model loads
        from ..dynamic.early_exit import HEADS_LEARNING_RATE, EarlyExit

        early_exit = EarlyExit(opts.early_exit, opts.exit_tau, pooling=opts.exit_pooling,
                               **({} if opts.ensemble_learning_rate is None else
                                  {"ensemble_learning_rate": opts.ensemble_learning_rate}))
        heads_lr = HEADS_LEARNING_RATE if opts.method is None else None  # the exits alone: the ZTW authors' rate
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
    recipe = recipe_of(opts.method)
    auto_lr = args.learning_rate == "auto"
    if args.learning_rate is None or auto_lr:  # (auto: a placeholder until the range test has picked)
        lr = (LEARNING_RATE["naggs"] if opts.optimizer == "naggs" else recipe.learning_rate if recipe
              else heads_lr or LEARNING_RATE["full" if opts.method == "full" else "adapter"])
    else:
        lr = args.learning_rate
    chosen = {"learning_rate": "auto" if auto_lr else "flag" if args.learning_rate is not None else "recipe"}
    from_recipe = recipe.training_arguments() if recipe else dict(warmup_steps=0.06, weight_decay=0.0,
                                                                  lr_scheduler_type="linear")
    from_recipe.pop("learning_rate", None)
    for k, v in from_recipe.items():
        chosen[k] = "flag" if getattr(args, k) is not None else "recipe"
        if getattr(args, k) is not None:
            from_recipe[k] = getattr(args, k)
    if opts.head_learning_rate is None and recipe is not None and recipe.head_learning_rate is not None:
        opts.head_learning_rate = recipe.head_learning_rate
        chosen["head_learning_rate"] = "recipe"
    try:
        training = _from_namespace(
            TrainingArguments, args, output_dir=args.output_dir or str(checkpoints), learning_rate=lr, **from_recipe,
            use_cpu=args.use_cpu or opts.device == "cpu")
    except ValueError as e:  # TrainingArguments' own checks
        raise LeanformerError(str(e)) from e
    main_process = training.process_index == 0

    task = load_task(opts.task)
    if main_process:
        print(f"task {opts.task}: read as {task.layout}")
    set_seed(training.seed)  # the head's and the adapter's initialisation follow --seed
    model, tokenizer = load(args.model, head="sequence-classification", num_labels=task.num_labels)
    if task.label_names:
        model.config.id2label = dict(enumerate(task.label_names))
        model.config.label2id = {n: i for i, n in enumerate(task.label_names)}
    alpha_given, targets_given = opts.alpha is not None, bool(opts.targets)
    method = (None if opts.method is None else "full" if opts.method == "full"
              else build_config(opts, classifier_head_name(model), model))
    if opts.method not in ("full", None):
        chosen.update(alpha="flag" if alpha_given else "recipe", targets="flag" if targets_given else "recipe")
    resume = training.resume_from_checkpoint or last_checkpoint(training.output_dir)
    if resume and main_process:
        print(f"resuming from {resume}")
    started = time.perf_counter()
    try:
        metrics = finetune(model, tokenizer, task, training, method=method, max_seq_length=opts.max_seq_length,
                           max_train_samples=opts.max_train_samples, max_eval_samples=opts.max_eval_samples,
                           head_learning_rate=opts.head_learning_rate, resume_from_checkpoint=resume,
                           learning_rate_test=RangeTest() if auto_lr else None,
                           eval_steps=int(training.eval_steps) if training.eval_steps else None,
                           early_exit=early_exit, **memory_options(opts), **sparsity_options(opts))
    except TrainingInterrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        return 130
    counts = trainable_parameters(model)
    result = {"model": str(args.model), "task": task.name, "task_layout": task.layout, "method": opts.method,
              **metrics}
    result["settings"] = {  # the values this run trained with, and where each came from (recipe, flag, auto)
        "learning_rate": training.learning_rate, "head_learning_rate": opts.head_learning_rate,
        "warmup_steps": training.warmup_steps, "weight_decay": training.weight_decay,
        "lr_scheduler_type": str(getattr(training.lr_scheduler_type, "value", training.lr_scheduler_type)),
        **({"alpha": opts.alpha} if opts.method not in ("full", None) else {}), "source": chosen,
        "recipe": recipe.to_json() if recipe else None}
    if opts.method not in ("full", None):
        from ..adapters import adapter_configs

        targets = next(iter(adapter_configs(model).values())).targets  # as resolved for this architecture
        result.update(rank=None if opts.method == "krona" else opts.rank, targets=targets)
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
    _plots(result, out)
    if auto_lr:
        t = result["learning_rate_test"]
        why = ("no step lowered the probe loss, so a tenth of the largest stable rate" if t["flat"] else
               f"a tenth of the range test's probe-loss minimum at {t['min_loss_lr']:.3g}")
        print(f"learning rate (auto): {t['learning_rate']:.3g} — {why}; curve in {out / 'lr_range_test.png'}")

    print(f"{opts.method}: trainable params {counts['trainable']:,} of {counts['total']:,} ({counts['percent']:.3f}%)")
    for k, v in result.items():
        print(f"{k:>24}: {v:.4f}" if isinstance(v, float) else f"{k:>24}: {v}")
    print(f"wrote {out}")
    return 0


def _plots(result: dict, out: Path) -> None:
    """loss_curve.png (and lr_range_test.png after --learning-rate auto) beside metrics.json."""
    import io

    from ..files import atomic_write_bytes
    from ..train.callbacks import plot_training
    from ..train.lr_finder import RangeTestResult, plot_range_test

    def write(name, draw):
        buf = io.BytesIO()
        draw(buf)
        atomic_write_bytes(out / name, buf.getvalue())

    if result.get("loss_curve", {}).get("step"):
        write("loss_curve.png", lambda f: plot_training(result["loss_curve"], result.get("eval_curve", []), f,
                                                         f"{result['method']} on {result['task']}"))
    if "learning_rate_test" in result:
        r = RangeTestResult.from_json(result["learning_rate_test"])
        write("lr_range_test.png", lambda f: plot_range_test(r, f))

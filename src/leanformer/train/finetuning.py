"""Fine-tuning on a sequence classification / regression task with transformers.Trainer.

`finetune(model, tokenizer, task, args)` trains the model's trainable parameters — an adapter added
with `lf.adapt` (and its modules_to_save, e.g. the classifier head), or every weight with
method="full" — under `args`, a transformers.TrainingArguments (learning rate, epochs, batch size,
warmup, clipping, seed, checkpoints, train_sampling_strategy="group_by_length", …), then evaluates
on the dev split and returns the metrics the `finetune` command writes to metrics.json: the task's
metrics by name, trainable_params, total_params, train_seconds_per_step (median), peak_rss_mb,
train_steps, train_samples, train_loss (mean of the last 50 steps), seed, processes.

Because it is Trainer, the same call scales with `torchrun` / `accelerate launch` (DDP), DeepSpeed
and FSDP, writes Trainer checkpoints every `save_steps`, and resumes from them
(`resume_from_checkpoint`). On SIGTERM or Ctrl-C it finishes the current step, writes a checkpoint
and raises TrainingInterrupted; the same call with resume_from_checkpoint=True then ends exactly
where an uninterrupted run would (same data order, RNG, optimizer and scheduler state).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
import re
import statistics
from enum import Enum

import torch
from torch import nn
from transformers import DataCollatorWithPadding, TrainingArguments
from transformers.trainer_pt_utils import LengthGroupedSampler

from ..adapters.base import AdapterConfig, adapt
from ..dynamic import early_exit as _early_exit
from ..errors import LeanformerError
from ..capture import residual_stream
from ..evaluation import evaluate_task
from ..architectures import head_modules
from ..models import classifier_head_name
from ..optim import optimizer_for, state_bytes
from ..runtime import peak_rss_mb
from ..tasks import Split, Task
from .callbacks import (TRAINER_STATE, EvaluateEvery, RecordingTrainer, SaveAndStopOnSignal, StallWarning, StepLog,
                        TrainingInterrupted, loss_curve)
from .lr_finder import RangeTest, range_test
from .randomized_backprop import RandomizedBackprop, apply_randomized_backprop, remove_randomized_backprop
from .regularizers import ActivationSparsity, CosineRegularizer, mlp_activations

# TrainingArguments that decide what a run computes; a checkpoint resumes only under the same values.
RESULT_ARGUMENTS = ("learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size",
                    "gradient_accumulation_steps", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon",
                    "max_grad_norm", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps", "optim", "seed",
                    "data_seed", "train_sampling_strategy", "label_smoothing_factor", "bf16", "fp16")
LOSS_WINDOW = 50  # train_loss: mean over this many last steps


class SeededLengthGroupedSampler(LengthGroupedSampler):
    """transformers' LengthGroupedSampler (train_sampling_strategy="group_by_length": batches of
    similar length inside shuffled mega-batches) with its own generator seeded by (seed, epoch). The
    stock sampler draws its permutation from the global RNG when an epoch starts, so a resumed run
    (and each process of a distributed one) would see another order."""

    def __init__(self, batch_size: int, lengths: list[int], seed: int):
        super().__init__(batch_size, lengths=lengths, generator=torch.Generator())
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:  # called by Trainer (through accelerate) at each epoch
        self.epoch = epoch

    def __iter__(self):
        self.generator.manual_seed(self.seed * 100003 + self.epoch)
        return super().__iter__()


class TaskTrainer(RecordingTrainer):
    """Trainer for sequence classification / regression: the task head can have its own learning
    rate (a separate optimizer param group), group-by-length batches come in a seeded order, and
    each batch's loss is taken as what it is, a mean over that batch.

    Why the last point: transformers treats a model whose forward accepts **kwargs as normalising its
    loss by `num_items_in_batch` over the whole accumulated, all-process batch, and then multiplies
    the loss by the process count and skips the division by the accumulation steps. Classification
    heads return a plain per-batch mean, so that would scale the gradient by the number of processes
    (or accumulation steps)."""

    def __init__(self, *args, head_learning_rate: float | None = None, lengths: list[int] | None = None,
                 linearity_reg: float = 0.0, sparsity_reg: ActivationSparsity | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        # finetune(sparsity_reg=...): warmed-up w·(square Hoyer or L1 of the MLP activations), D2DMoE's
        # sparsity phase (train/regularizers.py); each step's unweighted mean over blocks kept and logged
        self.sparsity = sparsity_reg if sparsity_reg is not None and sparsity_reg.weight else None
        self.head_learning_rate = head_learning_rate
        # finetune(linearity_reg=λ): λ·Σ(1 − cos(h_i, h_{i−1})) over the residual stream added to the loss
        # (train/regularizers.py); each step's unweighted sum is kept and logged
        self.regularizer = CosineRegularizer(linearity_reg) if linearity_reg else None
        # each active regulariser's unweighted value per training step, by the key it is logged under
        self.regularizer_values: dict[str, list[float]] = {
            **({"linearity_reg": []} if self.regularizer is not None else {}),
            **({"sparsity_reg": []} if self.sparsity is not None else {})}
        self.lengths = lengths
        self.model_accepts_loss_kwargs = False

    def create_optimizer(self, model=None):
        if self.optimizer is not None or self.head_learning_rate is None:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        head = classifier_head_name(opt_model)
        decay = set(self.get_decay_parameter_names(opt_model))
        groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
        for name, p in opt_model.named_parameters():
            if p.requires_grad:
                # the head's own name inside the path: "classifier.weight", or a peft model's
                # "base_model.model.classifier.modules_to_save.default.weight"
                parts = name.split(".")  # the early exits' heads (dynamic/early_exit.py) train at the head's rate too
                is_head = (head is not None and head in parts) or _early_exit.MODULE_NAME in parts
                groups.setdefault((is_head, name in decay), []).append(p)
        param_groups = [{"params": groups[key], "weight_decay": self.args.weight_decay if key[1] else 0.0,
                         "lr": self.head_learning_rate if key[0] else self.args.learning_rate, "head": key[0]}
                        for key in sorted(groups)]
        optimizer_cls, optimizer_kwargs = (self.optimizer_cls_and_kwargs
                                           or self.get_optimizer_cls_and_kwargs(self.args, opt_model))
        self.optimizer = optimizer_cls(param_groups, **optimizer_kwargs)
        return self.optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.regularizer is None and self.sparsity is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        unwrapped = self.accelerator.unwrap_model(model)
        with contextlib.ExitStack() as hooks:
            states = hooks.enter_context(residual_stream(unwrapped)) if self.regularizer is not None else None
            acts = hooks.enter_context(mlp_activations(unwrapped)) if self.sparsity is not None else None
            loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
            if self.regularizer is not None:
                per_layer = self.regularizer.per_layer(states, inputs.get("attention_mask"))
                if model.training:
                    self.regularizer_values["linearity_reg"].append(float(per_layer.sum().detach()))
                loss = loss + self.regularizer.lam * per_layer.sum()
            if self.sparsity is not None:
                sparsity = self.sparsity.per_layer(acts, inputs.get("attention_mask")).mean()
                if model.training:
                    self.regularizer_values["sparsity_reg"].append(float(sparsity.detach()))
                loss = loss + self.sparsity.weight_at(self.state.global_step, self.state.max_steps) * sparsity
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict, *args, **kwargs) -> None:
        if "loss" in logs:  # each regulariser's mean over the steps since the last log
            for key, values in self.regularizer_values.items():
                if values:
                    logs[key] = _window_mean(values, self.args.logging_steps * self.args.gradient_accumulation_steps)
        super().log(logs, *args, **kwargs)

    def _get_train_sampler(self, train_dataset=None):
        if self.args.train_sampling_strategy == "group_by_length" and self.lengths is not None:
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            return SeededLengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                              self.lengths, seed)
        return super()._get_train_sampler(train_dataset)


# ------------------------------------------------------------------------------------------------
# Data


def train_indices(n: int, max_train_samples: int | None) -> list[int]:
    """All n examples, or a fixed random sample of max_train_samples of them: drawn with seed 0,
    so it is the same whatever the training seed, and seeds vary only the training."""
    if n == 0:
        raise LeanformerError("the task's training split is empty")
    if max_train_samples is None or max_train_samples >= n:
        return list(range(n))
    if max_train_samples <= 0:
        raise LeanformerError(f"max_train_samples must be positive, got {max_train_samples}")
    g = torch.Generator().manual_seed(0)
    return sorted(torch.randperm(n, generator=g)[:max_train_samples].tolist())


def encode_split(tokenizer, split: Split, indices: list[int], max_seq_length: int) -> list[dict]:
    """One dict per example (input ids, masks, label), truncated to max_seq_length, unpadded: the
    collator pads each batch to its own longest example."""
    a = [split.text_a[i] for i in indices]
    b = [split.text_b[i] for i in indices] if split.text_b is not None else None
    enc = tokenizer(a, b, truncation=True, max_length=max_seq_length)
    return [{**{k: enc[k][j] for k in enc}, "labels": split.labels[i]} for j, i in enumerate(indices)]


def last_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest complete Trainer checkpoint in output_dir (trainer_state.json is its last file)."""
    if not os.path.isdir(output_dir):
        return None
    steps = [(int(m.group(1)), name) for name in os.listdir(output_dir)
             if (m := re.fullmatch(r"checkpoint-(\d+)", name))
             and os.path.isfile(os.path.join(output_dir, name, TRAINER_STATE))]
    return os.path.join(output_dir, max(steps)[1]) if steps else None


def _run_settings(args: TrainingArguments, model: nn.Module, task: Task, n_train: int, **options) -> dict:
    trainable = [(n, list(p.shape)) for n, p in model.named_parameters() if p.requires_grad]
    settings = {k: getattr(args, k) for k in RESULT_ARGUMENTS}
    settings = {k: v.value if isinstance(v, Enum) else v for k, v in settings.items()}
    settings.update(options, task=task.name, train_samples=n_train,
                    trainable=hashlib.sha256(json.dumps(trainable).encode()).hexdigest()[:16])
    return json.loads(json.dumps(settings, default=str))  # as it reads back from trainer_state.json


# ------------------------------------------------------------------------------------------------
# The verb


def finetune(model: nn.Module, tokenizer, task: Task, args: TrainingArguments, *,
             method: AdapterConfig | str | None = None, max_seq_length: int = 128,
             max_train_samples: int | None = None, max_eval_samples: int | None = None,
             head_learning_rate: float | None = None, resume_from_checkpoint: str | bool | None = None,
             callbacks: list | tuple = (), evaluate: bool = True, optimizer: str = "adamw",
             optimizer_options: dict | None = None, randomized_backprop: RandomizedBackprop | None = None,
             linearity_reg: float = 0.0, sparsity_reg: ActivationSparsity | None = None, relu_mlp: bool = False,
             learning_rate_test: RangeTest | None = None, eval_steps: int | None = None,
             loss_every: int | None = None, early_exit: "_early_exit.EarlyExit | None" = None) -> dict:
    """Train `model` (a sequence-classification model with task.num_labels outputs) on task.train
    with transformers.Trainer under `args`; evaluate on task.dev; return the metrics dict.

    method: None trains what requires grad (a model adapted with lf.adapt: its adapter and
    modules_to_save; a model fresh from from_pretrained: everything); "full" unfreezes and trains
    every weight; an adapter config (lf.LoRA(...), …) is applied first with lf.adapt, the task head
    added to its modules_to_save. resume_from_checkpoint: a checkpoint directory, or True for the
    newest complete one in args.output_dir; it must come from a run with the same settings.
    Raises TrainingInterrupted when SIGTERM / Ctrl-C stopped training after writing a checkpoint.

    Memory options: optimizer "adamw" (args.optim; SparseGrad / MeProp get leanformer.optim's
    sparse-state AdamW) or "naggs" (leanformer.optim.NAGGS, α = args.learning_rate, optimizer_options
    mu / gamma / fixed_gamma); randomized_backprop: a RandomizedBackprop config, the trainable Linear
    layers save a sketch of their input instead of the input during training; linearity_reg: λ of
    the cosine regulariser on the residual stream (train/regularizers.py), its value logged and
    returned as linearity_reg.

    Sparsity phase of D2DMoE (before lf.moefy): relu_mlp switches every MLP activation to ReLU
    first (dynamic/moe.py, relu_mlp); sparsity_reg, an ActivationSparsity, adds its warmed-up
    square-Hoyer or L1 term on the MLP activations, returned as sparsity_reg (unweighted, last steps'
    mean) with mlp_zero_fraction (share of exactly-zero MLP activations on the dev examples).

    Seeing the run: learning_rate_test (a RangeTest) replaces args.learning_rate by the pick of a
    learning-rate range test on training batches (train/lr_finder.py), returned as
    learning_rate_test; the training loss is returned every `loss_every` steps (default
    args.logging_steps; a tenth of the run when that is longer than the run) as loss_curve;
    eval_steps evaluates on dev every that many steps (eval_curve); a loss that has not moved by a
    third of training is warned about (warnings).

    early_exit: an lf.EarlyExit config: internal classifiers are put on the blocks (dynamic/early_exit.py;
    a model that has them keeps them) and trained on their mean cross-entropy, with the backbone frozen
    when method is None, else jointly with what `method` trains (the model's head's loss included);
    for kind "ztw" a second run of the same length then trains only the ensembles at
    early_exit.ensemble_learning_rate (its checkpoints under output_dir/ensemble; an interrupted
    ensemble phase restarts from its beginning). Returned under "early_exit": each exit's dev accuracy,
    and the dev metrics and cost at early_exit.tau."""
    n_labels = getattr(getattr(model, "config", None), "num_labels", None)
    if n_labels is not None and n_labels != task.num_labels:
        raise LeanformerError(f"the model's head has {n_labels} outputs but task {task.name} has "
                              f"{task.num_labels} label(s) {task.label_names or '(regression)'}")
    if max_seq_length < 2:
        raise LeanformerError(f"max_seq_length must be at least 2, got {max_seq_length}")
    if head_learning_rate is not None and head_learning_rate <= 0:
        raise LeanformerError(f"head_learning_rate must be positive, got {head_learning_rate}")
    if resume_from_checkpoint is True:
        resume_from_checkpoint = last_checkpoint(args.output_dir)
        if resume_from_checkpoint is None:
            raise LeanformerError(f"resume_from_checkpoint=True, but {args.output_dir} holds no complete "
                                  "checkpoint-N directory")
    resume_from_checkpoint = resume_from_checkpoint or None
    if relu_mlp:
        from ..dynamic.moe import relu_mlp as switch_to_relu
        switch_to_relu(model)
    indices = train_indices(len(task.train), max_train_samples)
    rows = encode_split(tokenizer, task.train, indices, max_seq_length)
    head = classifier_head_name(model)
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    elif isinstance(method, AdapterConfig):
        # every module the task head adds (DistilBERT's pre_classifier, DeBERTa's pooler, …) trains and is saved
        # (early exits' heads train as themselves, not as modules_to_save copies the hooks would not call)
        heads = [h for h in head_modules(model) if h != _early_exit.MODULE_NAME] if head else []
        keep = list(method.modules_to_save) + [h for h in heads if h not in method.modules_to_save]
        method = dataclasses.replace(method, modules_to_save=keep)
        if hasattr(method, "fit_basis"):  # SparseGrad: its basis comes from gradients on the first training batches
            method.fit_basis(model, _basis_batches(model, tokenizer, rows, args.per_device_train_batch_size,
                                                   method.basis_steps))
        adapt(model, method)
    elif method is not None:
        raise LeanformerError(f"method must be None, 'full' or an adapter config (lf.LoRA(...), …), got {method!r}")
    if early_exit is not None:
        _early_exit.prepare_training(model, early_exit, train_backbone=method is not None)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if trainable == 0:
        raise LeanformerError("the model has no trainable parameters: adapt it (lf.adapt, or method=lf.LoRA(...)) "
                              "or pass method='full'")

    optimizer_options = dict(optimizer_options or {})
    optimizer_cls_and_kwargs = optimizer_for(optimizer, model, args, **optimizer_options)
    collator = DataCollatorWithPadding(tokenizer)
    lengths = [len(r["input_ids"]) for r in rows]
    range_result = None
    if learning_rate_test is not None:  # on a throwaway Trainer of the same run; the model is restored after
        probe = TaskTrainer(model=model, args=args, train_dataset=rows, data_collator=collator,
                            head_learning_rate=head_learning_rate, lengths=lengths, linearity_reg=linearity_reg,
                            sparsity_reg=sparsity_reg, optimizer_cls_and_kwargs=optimizer_cls_and_kwargs)
        range_result = range_test(probe, learning_rate_test)
        args.learning_rate = range_result.learning_rate
        optimizer_cls_and_kwargs = optimizer_for(optimizer, model, args, **optimizer_options)  # at the picked lr
    run = _run_settings(args, model, task, len(indices), max_seq_length=max_seq_length,
                        head_learning_rate=head_learning_rate, optimizer=optimizer, optimizer_options=optimizer_options,
                        randomized_backprop=dataclasses.asdict(randomized_backprop) if randomized_backprop else None,
                        linearity_reg=linearity_reg, relu_mlp=relu_mlp,
                        sparsity_reg=dataclasses.asdict(sparsity_reg) if sparsity_reg else None,
                        early_exit=early_exit.to_dict() if early_exit is not None else None)
    # A Trainer checkpoint holds torch.save'd files (optimizer.pt, scheduler.pt, rng_state.pth: pickles).
    # transformers 5.24 reads them only with torch.load(weights_only=True), which refuses arbitrary
    # objects (Trainer._load_optimizer_and_scheduler, _load_rng_state), and never reads training_args.bin;
    # leanformer itself reads only trainer_state.json (JSON). Keep it that way: no other loader for them.
    step_log = StepLog.from_checkpoint(resume_from_checkpoint, run) if resume_from_checkpoint else StepLog(run)
    stopper = SaveAndStopOnSignal()
    stall = StallWarning(step_log, args.learning_rate)
    evaluator = None if not eval_steps else EvaluateEvery(eval_steps, lambda m: evaluate_task(
        m, tokenizer, task, "dev", args.per_device_eval_batch_size, max_seq_length, max_eval_samples))
    trainer = TaskTrainer(model=model, args=args, train_dataset=rows, data_collator=collator,
                          callbacks=[stopper, stall, *([evaluator] if evaluator else []), *callbacks],
                          step_log=step_log, head_learning_rate=head_learning_rate,
                          lengths=lengths, linearity_reg=linearity_reg, sparsity_reg=sparsity_reg,
                          optimizer_cls_and_kwargs=optimizer_cls_and_kwargs)
    if randomized_backprop is not None:
        apply_randomized_backprop(model, randomized_backprop)
    try:
        trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    finally:
        stopper.restore()
        if randomized_backprop is not None:
            remove_randomized_backprop(model)
    state = trainer.state
    if stopper.stopped_at is not None and state.global_step < state.max_steps:
        raise TrainingInterrupted(
            f"{stopper.stopped_by}: stopped after step {state.global_step} of {state.max_steps} and wrote "
            f"{os.path.join(args.output_dir, f'checkpoint-{state.global_step}')}; run again with the same arguments "
            "(and resume_from_checkpoint) to continue")
    ensemble_phase = None
    if early_exit is not None and early_exit.kind == "ztw":
        ensemble_phase = _train_ensembles(model, args, rows, collator, lengths, early_exit, optimizer, optimizer_options,
                                          callbacks, step_log.run)
    if early_exit is not None:
        _early_exit.end_training(model)
        _early_exit.exit_heads(model).reset_cost()
    model.eval()

    metrics: dict = {}
    if evaluate:
        metrics.update(evaluate_task(model, tokenizer, task, "dev", args.per_device_eval_batch_size, max_seq_length,
                                     max_eval_samples))
    train_loss = _window_mean(step_log.losses, LOSS_WINDOW) if step_log.losses else None
    if train_loss is not None and args.world_size > 1:  # each process logged the loss of its own batches
        train_loss = float(trainer.accelerator.reduce(torch.tensor(train_loss, device=args.device), "mean"))
    metrics.update({
        "trainable_params": trainable,
        "total_params": sum(p.numel() for p in model.parameters()),
        "train_seconds_per_step": statistics.median(step_log.seconds) if step_log.seconds else None,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "train_steps": state.global_step,
        "train_samples": len(indices),
        "train_loss": train_loss,
        "seed": args.seed,
        "processes": args.world_size,
        "learning_rate": args.learning_rate,
        "head_learning_rate": head_learning_rate,
        "loss_curve": loss_curve(step_log.losses, loss_every or _loss_every(args.logging_steps, state.max_steps)),
        "warnings": [stall.message] if stall.message else [],
        "optimizer": optimizer,
        "optimizer_state_bytes": state_bytes(trainer.optimizer) if trainer.optimizer is not None else None,
    })
    if range_result is not None:
        metrics["learning_rate_test"] = range_result.to_json()
    if evaluator is not None:
        metrics["eval_curve"] = evaluator.history
    for key, values in trainer.regularizer_values.items():
        metrics[key] = _window_mean(values, LOSS_WINDOW) if values else None
    if early_exit is not None:
        dev = task.dev
        n = len(dev) if max_eval_samples is None else min(max_eval_samples, len(dev))
        metrics["early_exit"] = {
            **early_exit.to_dict(), "cost": _early_exit.exit_heads(model).cost() if evaluate else None,
            "exit_accuracy": _early_exit.exit_accuracies(model, tokenizer, dev.text_a[:n],
                                                         None if dev.text_b is None else dev.text_b[:n], dev.labels[:n],
                                                         args.per_device_eval_batch_size, max_seq_length),
            **(ensemble_phase or {})}
    if trainer.sparsity is not None or relu_mlp:
        metrics["mlp_zero_fraction"] = _mlp_zero_fraction(model, tokenizer, task, max_seq_length)
    return metrics


def _window_mean(values: list[float], window: int) -> float:
    """Mean of the last `window` (at least one) values."""
    last = values[-max(1, window):]
    return float(sum(last) / len(last))


def _train_ensembles(model: nn.Module, args: TrainingArguments, rows: list[dict], collator, lengths: list[int],
                     config, optimizer: str, optimizer_options: dict, callbacks, run: dict) -> dict:
    """ZTW's second phase: the geometric ensembles alone, the same number of steps, at their own rate."""
    heads = _early_exit.start_ensemble_phase(model)
    phase_args = copy.copy(args)
    phase_args.learning_rate = config.ensemble_learning_rate
    phase_args.output_dir = os.path.join(args.output_dir, "ensemble")
    step_log = StepLog({**run, "phase": "ensemble", "learning_rate": config.ensemble_learning_rate})
    stopper = SaveAndStopOnSignal()
    trainer = TaskTrainer(model=model, args=phase_args, train_dataset=rows, data_collator=collator,
                          callbacks=[stopper, *callbacks], step_log=step_log, lengths=lengths,
                          optimizer_cls_and_kwargs=optimizer_for(optimizer, model, phase_args, **optimizer_options))
    try:
        trainer.train()
    finally:
        stopper.restore()
    state = trainer.state
    if stopper.stopped_at is not None and state.global_step < state.max_steps:
        raise TrainingInterrupted(f"{stopper.stopped_by}: stopped in the ensemble phase after step {state.global_step} "
                                  f"of {state.max_steps}; run again with the same arguments (the ensemble phase "
                                  "restarts from its beginning)")
    losses = step_log.losses[-LOSS_WINDOW:]
    return {"ensemble_train_steps": state.global_step,
            "ensemble_train_loss": float(sum(losses) / len(losses)) if losses else None,
            "ensemble_trainable_params": sum(p.numel() for p in heads.ensembles.parameters()),
            "ensemble_weights": [[round(float(w), 4) for w in e.weight.detach().exp()] for e in heads.ensembles]}


@torch.no_grad()
def _mlp_zero_fraction(model: nn.Module, tokenizer, task: Task, max_seq_length: int, n: int = 256) -> float:
    """Share of exactly-zero MLP activations over the valid tokens of the first n dev examples."""
    from ..capture import _valid_tokens

    device = next(model.parameters()).device
    zeros = total = 0
    for i in range(0, min(n, len(task.dev)), 32):
        a = task.dev.text_a[i:i + 32]
        b = task.dev.text_b[i:i + 32] if task.dev.text_b is not None else None
        enc = tokenizer(a, b, truncation=True, max_length=max_seq_length, padding=True, return_tensors="pt").to(device)
        with mlp_activations(model) as acts:
            model(**enc)
        for act in acts:
            valid = _valid_tokens(act, enc["attention_mask"].bool(), "MLP activation")
            zeros, total = zeros + int((valid == 0).sum()), total + valid.numel()
    return zeros / max(total, 1)


def _steps(value: float, max_steps: int) -> int:
    """TrainingArguments' step counts may be a ratio of the whole run (< 1)."""
    return max(1, math.ceil(value * max_steps)) if value < 1 else int(value)


def _loss_every(logging_steps: float, max_steps: int) -> int:
    every = _steps(logging_steps, max_steps)
    return every if every <= max_steps else max(1, max_steps // 10)


def _basis_batches(model: nn.Module, tokenizer, rows: list[dict], batch_size: int, n_batches: int):
    """The first n_batches padded batches of the encoded training rows (labels included), on the model's device."""
    rows = rows[: n_batches * batch_size]
    collate = DataCollatorWithPadding(tokenizer, return_tensors="pt")
    device = next(model.parameters()).device
    for i in range(0, len(rows), batch_size):
        yield {k: v.to(device) for k, v in collate(rows[i:i + batch_size]).items()}

"""A small accelerate training loop for sequence classification / regression, resumable.

`train_classifier(model, tokenizer, task, TrainConfig(...))` trains whatever parameters of `model`
have requires_grad (an adapter, a head, or everything), evaluates on the dev split and returns the
metrics dict that finetune / bench write (task metrics, trainable_params, total_params,
train_seconds_per_step, peak_rss_mb, ...). It runs on `accelerate`, so `accelerate launch` scales it.

Checkpoints (`checkpoint_dir`) hold the trainable parameters, optimizer and scheduler state, the RNG
state and the step, in safetensors + JSON (never pickle). One is written every `save_steps` and
when the run is interrupted (Ctrl-C / SIGTERM), so a rerun with the same arguments continues from
the last finished step and ends where an uninterrupted run would.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import signal
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..tasks import Task
from ..errors import LeanformerError
from ..files import load_json, load_tensors, output_dir, save_json, save_tensors
from ..runtime import peak_rss_mb, set_seed

CHECKPOINT = "checkpoint"


@dataclass
class TrainConfig:
    learning_rate: float = 5e-4
    head_learning_rate: float | None = None  # a separate lr for modules_to_save (e.g. the classifier)
    num_train_epochs: float = 1.0
    max_steps: int | None = None             # overrides epochs when set
    per_device_train_batch_size: int = 32
    per_device_eval_batch_size: int = 64
    max_seq_length: int = 128
    max_train_samples: int | None = None     # a fixed random sample (seed 0), the same for every --seed
    max_eval_samples: int | None = None
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    max_grad_norm: float = 1.0
    # Batch examples of similar length (HF's --group_by_length): far less padding, same examples.
    group_by_length: bool = True
    seed: int = 0
    checkpoint_dir: str | None = None
    save_steps: int = 200
    progress: bool = True
    evaluate: bool = True


def _train_indices(task: Task, cfg: TrainConfig) -> list[int]:
    n = len(task.train)
    if n == 0:
        raise LeanformerError(f"task {task.name} has an empty training split")
    if cfg.max_train_samples is not None:
        if cfg.max_train_samples <= 0:
            raise LeanformerError(f"--max-train-samples must be positive, got {cfg.max_train_samples}")
        if cfg.max_train_samples < n:  # one fixed sample whatever --seed, so seeds vary only the training
            g = torch.Generator().manual_seed(0)
            return sorted(torch.randperm(n, generator=g)[: cfg.max_train_samples].tolist())
    return list(range(n))


def _example_lengths(tokenizer, task: Task, indices: list[int], max_length: int) -> dict[int, int]:
    split = task.train
    a = [split.text_a[i] for i in indices]
    b = [split.text_b[i] for i in indices] if split.text_b is not None else None
    ids = tokenizer(a, b, truncation=True, max_length=max_length)["input_ids"]
    return {i: len(x) for i, x in zip(indices, ids)}


def _group_by_length(order: list[int], lengths: dict[int, int], batch_size: int) -> list[int]:
    """Within shuffled mega-batches of 50 batches, sort by length, so each batch pads little while
    the epoch's order stays random at the mega-batch scale (as transformers' LengthGroupedSampler)."""
    mega = 50 * batch_size
    out: list[int] = []
    for i in range(0, len(order), mega):
        out += sorted(order[i:i + mega], key=lambda j: -lengths[j])
    return out


def _collate(tokenizer, task: Task, max_length: int):
    split = task.train
    dtype = torch.float32 if task.is_regression else torch.long

    def collate(idx: list[int]) -> dict[str, torch.Tensor]:
        a = [split.text_a[i] for i in idx]
        b = [split.text_b[i] for i in idx] if split.text_b is not None else None
        enc = tokenizer(a, b, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        enc["labels"] = torch.tensor([split.labels[i] for i in idx], dtype=dtype)
        return dict(enc)

    return collate


def _fingerprint(cfg: TrainConfig, model: nn.Module, n_train: int) -> str:
    """What must match for a checkpoint to be resumed: the run's arguments and the trainable tensors."""
    keep = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("checkpoint_dir", "save_steps", "progress")}
    shapes = [(n, list(p.shape)) for n, p in model.named_parameters() if p.requires_grad]
    return hashlib.sha256(json.dumps([keep, shapes, n_train], sort_keys=True).encode()).hexdigest()[:16]


def _py_rng_json() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _save_checkpoint(path: Path, model, optimizer, scheduler, state: dict) -> None:
    tensors = {f"param::{n}": p for n, p in model.named_parameters() if p.requires_grad}
    opt = optimizer.state_dict()
    for idx, st in opt["state"].items():
        for k, v in st.items():
            tensors[f"opt::{idx}::{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    tensors["rng::torch"] = torch.get_rng_state()
    meta = dict(state, param_groups=opt["param_groups"], scheduler=scheduler.state_dict(),
                py_rng=_py_rng_json())
    with output_dir(path, overwrite=True) as tmp:
        save_tensors(tmp / "state.safetensors", tensors)
        save_json(tmp / "trainer_state.json", meta)


def _load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    tensors = load_tensors(path / "state.safetensors")
    meta = load_json(path / "trainer_state.json")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in tensors.items():
            if k.startswith("param::"):
                params[k[len("param::"):]].copy_(v)
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("opt::"):
            _, idx, name = k.split("::")
            state.setdefault(int(idx), {})[name] = v
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    torch.set_rng_state(tensors["rng::torch"])
    return meta


def train_classifier(model: nn.Module, tokenizer, task: Task, cfg: TrainConfig | None = None,
                     callback: Callable[[int, float], None] | None = None,
                     head_modules: tuple[str, ...] = ("classifier", "score")) -> dict:
    """Train the model's trainable parameters on task.train; return metrics (see module docstring)."""
    from accelerate import Accelerator
    from transformers import get_scheduler

    cfg = cfg or TrainConfig()
    if cfg.per_device_train_batch_size <= 0:
        raise LeanformerError(f"--per-device-train-batch-size must be positive, got {cfg.per_device_train_batch_size}")
    if cfg.learning_rate <= 0:
        raise LeanformerError(f"--learning-rate must be positive, got {cfg.learning_rate}")
    n_labels = getattr(model.config, "num_labels", None)
    if n_labels is not None and n_labels != task.num_labels:
        raise LeanformerError(f"the model's head has {n_labels} outputs but task {task.name} has "
                              f"{task.num_labels} label(s) {task.label_names or '(regression)'}")
    set_seed(cfg.seed)
    accelerator = Accelerator(cpu=not torch.cuda.is_available() or next(model.parameters()).device.type == "cpu")
    indices = _train_indices(task, cfg)
    steps_per_epoch = math.ceil(len(indices) / (cfg.per_device_train_batch_size * accelerator.num_processes))
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.num_train_epochs * steps_per_epoch))

    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise LeanformerError("the model has no trainable parameters (adapt it, or use method 'full')")
    is_head = lambda n: any(f".{h}." in f".{n}" or n.startswith(h + ".") for h in head_modules)  # noqa: E731
    groups = [{"params": [p for n, p in trainable if not is_head(n)], "lr": cfg.learning_rate},
              {"params": [p for n, p in trainable if is_head(n)], "lr": cfg.head_learning_rate or cfg.learning_rate}]
    groups = [g for g in groups if g["params"]]
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=int(cfg.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    collate = _collate(tokenizer, task, cfg.max_seq_length)
    lengths = _example_lengths(tokenizer, task, indices, cfg.max_seq_length) if cfg.group_by_length else None

    run_id = _fingerprint(cfg, model, len(indices))
    ckpt = Path(cfg.checkpoint_dir) / CHECKPOINT if cfg.checkpoint_dir else None
    step, step_times, losses = 0, [], []
    if ckpt is not None and (ckpt / "trainer_state.json").is_file():
        meta = load_json(ckpt / "trainer_state.json")
        if meta.get("run_id") != run_id:
            raise LeanformerError(f"{ckpt} belongs to a run with other arguments or another model; "
                                  "use a new checkpoint directory (or delete it) to start afresh")
        meta = _load_checkpoint(ckpt, accelerator.unwrap_model(model), optimizer, scheduler)
        version, internal, gauss = meta["py_rng"]
        random.setstate((version, tuple(internal), gauss))
        step, step_times, losses = meta["step"], meta["step_times"], meta["losses"]

    def save():
        if ckpt is not None and accelerator.is_main_process:
            _save_checkpoint(ckpt, accelerator.unwrap_model(model), optimizer, scheduler,
                             {"run_id": run_id, "step": step, "step_times": step_times, "losses": losses})

    # SIGTERM (a scheduler's kill) is turned into KeyboardInterrupt so both save a checkpoint.
    def on_term(signum, frame):
        raise KeyboardInterrupt
    old_term = signal.signal(signal.SIGTERM, on_term) if ckpt is not None else None

    model.train()
    bar = tqdm(total=total_steps, initial=step, desc=f"train {task.name}", unit="step",
               disable=not cfg.progress or not accelerator.is_local_main_process)
    try:
        while step < total_steps:
            epoch, done_in_epoch = divmod(step, steps_per_epoch)
            g = torch.Generator().manual_seed(cfg.seed * 100003 + epoch)
            order = [indices[i] for i in torch.randperm(len(indices), generator=g).tolist()]
            if lengths is not None:
                order = _group_by_length(order, lengths, cfg.per_device_train_batch_size)
            # A private generator: a DataLoader iterator otherwise draws its base seed from the global
            # RNG, and a resumed run would then shift the dropout / rank-sampling stream.
            loader = torch.utils.data.DataLoader(order, batch_size=cfg.per_device_train_batch_size,
                                                 shuffle=False, collate_fn=collate,
                                                 generator=torch.Generator().manual_seed(epoch))
            loader = accelerator.prepare(loader)
            if done_in_epoch:
                loader = accelerator.skip_first_batches(loader, done_in_epoch)
            for batch in loader:
                t0 = time.perf_counter()
                loss = model(**batch).loss
                accelerator.backward(loss)
                if cfg.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step_times.append(time.perf_counter() - t0)
                losses.append(float(loss.detach()))
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
                if callback is not None:
                    callback(step, losses[-1])
                if ckpt is not None and step % cfg.save_steps == 0:
                    save()
                if step >= total_steps:
                    break
    except KeyboardInterrupt:
        save()  # every finished step is kept; rerun the same command to continue
        raise
    finally:
        bar.close()
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
    save()
    model = accelerator.unwrap_model(model)
    model.eval()

    counts_trainable = sum(p.numel() for _, p in trainable)
    metrics: dict = {}
    if cfg.evaluate:
        from ..evaluation import evaluate_task

        metrics.update(evaluate_task(model, tokenizer, task, "dev", cfg.per_device_eval_batch_size,
                                     cfg.max_seq_length, cfg.max_eval_samples))
    metrics.update({
        "trainable_params": counts_trainable,
        "total_params": sum(p.numel() for p in model.parameters()),
        "train_seconds_per_step": statistics.median(step_times) if step_times else None,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "train_steps": step,
        "train_samples": len(indices),
        "train_loss": float(np.mean(losses[-50:])) if losses else None,
        "seed": cfg.seed,
    })
    return metrics

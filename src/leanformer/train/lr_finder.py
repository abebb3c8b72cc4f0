"""`--learning-rate auto`: a learning-rate range test on training batches (Smith 2017, "Cyclical
Learning Rates for Training Neural Networks", §3.3; the "LR finder" of fastai).

The learning rate grows exponentially from `min_lr` to `max_lr` over `steps` optimizer steps on
training batches, the loss of each step is smoothed (exponential moving average, bias-corrected),
and the test stops early once the smoothed loss has blown up to `diverge_factor`× its minimum. The
pick is the learning rate at the smoothed minimum divided by `safety` (10: the minimum sits at the
edge of divergence; a tenth of it is the usual choice, fastai's `lr_min`), clipped to the tested
range. Only training batches are used, never dev data.

The test trains the real model with the real optimizer (a classifier head with its own learning
rate keeps that rate; every other parameter group sweeps), then puts back every trainable parameter
and the RNG state, so the run that follows starts exactly where it would have without the test.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import LeanformerError


@dataclass
class RangeTest:
    """Settings of the range test (the defaults are what `--learning-rate auto` runs)."""
    min_lr: float = 1e-6
    max_lr: float = 1.0
    steps: int = 40          # "a few dozen": enough points per decade (≈ 6.7) to see the valley
    smoothing: float = 0.8   # EMA weight of the past; short runs need less smoothing than fastai's 0.98
    diverge_factor: float = 4.0
    safety: float = 10.0


@dataclass
class RangeTestResult:
    learning_rate: float                      # the pick
    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)           # raw loss of each step
    smoothed: list[float] = field(default_factory=list)
    min_loss_lr: float | None = None
    stopped_early: bool = False

    def to_json(self) -> dict:
        return {"learning_rate": self.learning_rate, "min_loss_lr": self.min_loss_lr,
                "stopped_early": self.stopped_early, "lrs": self.lrs, "losses": self.losses,
                "smoothed": self.smoothed}


def range_test(trainer, settings: RangeTest = RangeTest()) -> RangeTestResult:
    """Run the range test with `trainer` (a transformers.Trainer whose model and training set are the
    run's own) and return the picked learning rate with the curve. The model's trainable
    parameters and the RNG state are restored afterwards; the trainer's optimizer is discarded."""
    loader = trainer.get_train_dataloader()
    available = len(loader)
    if available < settings.steps:
        bs = trainer.args.per_device_train_batch_size * max(1, trainer.args.gradient_accumulation_steps)
        raise LeanformerError(
            f"--learning-rate auto runs a range test of {settings.steps} training batches, but the training set "
            f"gives only {available} batch(es) of {bs} ({available * bs} examples or fewer); it needs at least "
            f"{settings.steps * bs} training examples at this batch size. Pass a --learning-rate (the method's "
            "recipe value is printed by --help), or a smaller --per-device-train-batch-size")
    model = trainer.model
    params = [p for p in model.parameters() if p.requires_grad]
    saved = [p.detach().clone() for p in params]
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    was_training = model.training

    trainer.optimizer = None
    optimizer = trainer.create_optimizer()
    # A head with its own learning rate keeps it (as in the run that follows); every other group sweeps.
    swept = [not g.get("head", False) for g in optimizer.param_groups]
    growth = (settings.max_lr / settings.min_lr) ** (1.0 / max(1, settings.steps - 1))
    result = RangeTestResult(learning_rate=float("nan"))
    avg, best, best_lr = 0.0, math.inf, None
    model.train()
    try:
        for i, batch in enumerate(loader):
            if i >= settings.steps:
                break
            lr = settings.min_lr * growth ** i
            for g, sweep in zip(optimizer.param_groups, swept):
                if sweep:
                    g["lr"] = lr
            batch = trainer._prepare_inputs(batch)
            loss = trainer.compute_loss(model, batch)
            trainer.accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            value = float(loss.detach())
            avg = settings.smoothing * avg + (1 - settings.smoothing) * value
            smoothed = avg / (1 - settings.smoothing ** (i + 1))
            result.lrs.append(lr)
            result.losses.append(value)
            result.smoothed.append(smoothed)
            if not math.isfinite(value) or (i > 2 and smoothed > settings.diverge_factor * best):
                result.stopped_early = True
                break
            if smoothed < best:
                best, best_lr = smoothed, lr
    finally:
        with torch.no_grad():
            for p, v in zip(params, saved):
                p.copy_(v)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        trainer.optimizer = None  # the run builds its own, with the picked rate
        optimizer.zero_grad(set_to_none=True)
        model.train(was_training)
    if best_lr is None:
        raise LeanformerError("the learning-rate range test produced no finite loss; check the data and the model")
    result.min_loss_lr = best_lr
    result.learning_rate = max(settings.min_lr, best_lr / settings.safety)
    return result


def plot_range_test(result: RangeTestResult, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.plot(result.lrs, result.losses, ".", color="0.6", label="loss per step")
    ax.plot(result.lrs, result.smoothed, "-", label="smoothed")
    ax.axvline(result.learning_rate, color="C3", ls="--", label=f"picked {result.learning_rate:.2g}")
    if result.min_loss_lr:
        ax.axvline(result.min_loss_lr, color="0.4", ls=":", label=f"minimum {result.min_loss_lr:.2g}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.set_title("learning-rate range test (training batches)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

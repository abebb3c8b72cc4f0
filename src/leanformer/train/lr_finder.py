"""`--learning-rate auto`: a learning-rate range test on training batches (Smith 2017, "Cyclical
Learning Rates for Training Neural Networks", §3.3; the "LR finder" of fastai).

The learning rate grows exponentially from `min_lr` to `max_lr` over `steps` optimizer steps on
training batches. After each step the loss of a fixed *probe* of `probe_examples` training examples
(held out of the sweep, evaluated without dropout) is recorded: the loss of the step's own batch,
what fastai reads, is mostly batch-to-batch noise for a classifier near its starting loss (ln 2
for two classes) at the batch sizes of a CPU run, and its minimum then falls anywhere. The test
stops once the probe loss has blown up to `diverge_factor`× its minimum. Only the stable part of
the curve is read: the steps before the probe loss first rises `rise` (10 %) above its start;
beyond it the loss swings and can dip by luck. The pick is the learning rate at the probe's
minimum there divided by `safety` (10: the minimum sits near the edge of divergence; a tenth of it
is the usual choice, fastai's `lr_min`). When no stable step lowered the probe loss by `min_drop`
(relative), the minimum is noise: the pick is then the last stable learning rate divided by
`safety`, and the result says so (`flat`). Only training batches are used, never dev data.

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
    probe_examples: int = 32  # the fixed training examples whose loss is read after every step
    diverge_factor: float = 4.0
    min_drop: float = 0.01   # a probe minimum less than 1 % below the start is noise
    rise: float = 0.1        # the probe loss 10 % above its start marks the edge of stability
    safety: float = 10.0


@dataclass
class RangeTestResult:
    learning_rate: float                      # the pick
    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)           # loss of each step's own batch
    min_loss_lr: float | None = None                            # where the probe loss is lowest
    stopped_early: bool = False
    probe_losses: list[float] = field(default_factory=list)     # the probe's loss after each step
    probe_start: float | None = None                            # … and before the first
    flat: bool = False                                          # no step lowered it by min_drop

    def to_json(self) -> dict:
        return {"learning_rate": self.learning_rate, "min_loss_lr": self.min_loss_lr,
                "stopped_early": self.stopped_early, "flat": self.flat, "lrs": self.lrs, "losses": self.losses,
                "probe_losses": self.probe_losses, "probe_start": self.probe_start}

    @classmethod
    def from_json(cls, d: dict) -> "RangeTestResult":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def range_test(trainer, settings: RangeTest = RangeTest()) -> RangeTestResult:
    """Run the range test with `trainer` (a transformers.Trainer whose model and training set are the
    run's own) and return the picked learning rate with the curve. The model's trainable
    parameters and the RNG state are restored afterwards; the trainer's optimizer is discarded."""
    loader = trainer.get_train_dataloader()
    bs = trainer.args.per_device_train_batch_size * max(1, trainer.args.gradient_accumulation_steps)
    probe_batches = -(-settings.probe_examples // trainer.args.per_device_train_batch_size)
    needed, available = probe_batches + settings.steps, len(loader)
    if available < needed:
        raise LeanformerError(
            f"--learning-rate auto runs a range test of {settings.steps} training batches plus {probe_batches} held "
            f"out as its probe, but the training set gives only {available} batch(es) of {bs} ({available * bs} "
            f"examples or fewer); it needs at least {needed * bs} training examples at this batch size. Pass a "
            "--learning-rate (the method's recipe value is printed by --help), or a smaller "
            "--per-device-train-batch-size")
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
    batches = iter(loader)
    probe = [trainer._prepare_inputs(next(batches)) for _ in range(probe_batches)]

    def probe_loss() -> float:
        model.eval()
        with torch.no_grad():
            total = sum(float(trainer.compute_loss(model, b)) * len(b["input_ids"]) for b in probe)
        model.train()
        return total / sum(len(b["input_ids"]) for b in probe)

    try:
        result.probe_start = probe_loss()
        for i in range(settings.steps):
            lr = settings.min_lr * growth ** i
            for g, sweep in zip(optimizer.param_groups, swept):
                if sweep:
                    g["lr"] = lr
            loss = trainer.compute_loss(model, trainer._prepare_inputs(next(batches)))
            trainer.accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            value = float(loss.detach())
            result.lrs.append(lr)
            result.losses.append(value)
            result.probe_losses.append(probe_loss())
            lowest = min([result.probe_start, *result.probe_losses])
            if not math.isfinite(result.probe_losses[-1]) or result.probe_losses[-1] > settings.diverge_factor * lowest:
                result.stopped_early = True
                break
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
    if not result.probe_losses or not math.isfinite(result.probe_start):
        raise LeanformerError("the learning-rate range test produced no finite loss; check the data and the model")
    result.learning_rate, result.min_loss_lr, result.flat = pick(result.lrs, result.probe_start,
                                                                 result.probe_losses, settings)
    return result


def pick(lrs: list[float], start: float, probe_losses: list[float], settings: RangeTest = RangeTest()
         ) -> tuple[float, float, bool]:
    """(picked lr, lr at the probe minimum, flat) from a probe-loss curve; see the module docstring.

    Only the stable part of the curve counts: the steps before the probe loss first rises `rise`
    above its start. Past that edge the loss swings, and a lucky dip at a rate that has already
    started to diverge must not be the minimum."""
    stable = []
    for v, lr in zip(probe_losses, lrs):
        if not math.isfinite(v) or v > start * (1 + settings.rise):
            break
        stable.append((v, lr))
    if not stable:
        return settings.min_lr, lrs[0] if lrs else settings.min_lr, True
    best, min_lr = min(stable)
    flat = best > start * (1 - settings.min_drop)
    base = stable[-1][1] if flat else min_lr  # flat: nothing learned within the test, take the edge of stability
    return max(settings.min_lr, base / settings.safety), min_lr, flat


def plot_range_test(result: RangeTestResult, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.plot(result.lrs, result.losses, ".", color="0.6", label="loss of the step's batch")
    if result.probe_losses:
        ax.plot(result.lrs[:len(result.probe_losses)], result.probe_losses, "-", color="C0", lw=2,
                label="probe loss (what the pick reads)")
    ax.axvline(result.learning_rate, color="C3", ls="--", label=f"picked {result.learning_rate:.2g}")
    if result.min_loss_lr:
        ax.axvline(result.min_loss_lr, color="0.4", ls=":",
                   label=f"probe minimum {result.min_loss_lr:.2g}" + (" (flat: noise)" if result.flat else ""))
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.set_title("learning-rate range test (training batches)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

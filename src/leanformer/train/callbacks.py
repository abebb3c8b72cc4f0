"""What leanformer's Trainer subclasses add to transformers.Trainer: a record of every optimizer
step, kept inside Trainer's own checkpoints, and a clean stop on SIGTERM / Ctrl-C.

`RecordingTrainer` records each optimizer step's wall time and loss in a `StepLog` callback.
`StepLog` is an `ExportableState`, so Trainer writes it into each checkpoint's trainer_state.json
(as JSON, never pickle); a resumed run reads it back with `StepLog.from_checkpoint` and reports
figures over the whole run, as an uninterrupted one would.

`SaveAndStopOnSignal` turns SIGTERM (a scheduler's preemption notice) and a first Ctrl-C into
"finish this optimizer step, write a checkpoint, stop"; the checkpoint then sits at a step
boundary with the RNG state after that step, so resuming from it continues bit for bit.
(transformers' own `enable_jit_checkpoint` may checkpoint between backward and optimizer step,
where the saved RNG state has already served that step's dropout.) Under several processes the
processes agree on the step to stop at (an all-reduce of the flag), so none waits forever on a
collective the others have left.
"""
from __future__ import annotations

import os
import signal
import threading
import time

import torch
import torch.distributed as dist
from transformers import PrinterCallback, ProgressCallback, Trainer, TrainerCallback
from transformers.trainer_callback import ExportableState, TrainerState

from ..errors import LeanformerError

TRAINER_STATE = "trainer_state.json"


class StepLog(TrainerCallback, ExportableState):
    """Seconds and loss of every optimizer step of this process, and `run`: the settings that
    decide a run's result, so a checkpoint is only resumed by the run it belongs to."""

    def __init__(self, run: dict | None = None, seconds: list[float] | None = None, losses: list[float] | None = None):
        self.run = dict(run or {})
        self.seconds = list(seconds or [])
        self.losses = list(losses or [])
        self._started: float | None = None
        self._loss: torch.Tensor | None = None  # summed over the step's micro-batches

    def state(self) -> dict:
        return {"args": {"run": self.run, "seconds": self.seconds, "losses": self.losses}, "attributes": {}}

    @classmethod
    def from_checkpoint(cls, checkpoint: str | os.PathLike, run: dict) -> "StepLog":
        """The log saved in `checkpoint`, after checking it was written by a run with these settings."""
        path = os.path.join(checkpoint, TRAINER_STATE)
        if not os.path.isfile(path):
            raise LeanformerError(f"{checkpoint} is not a Trainer checkpoint: it has no {TRAINER_STATE}")
        saved = TrainerState.load_from_json(path).stateful_callbacks.get(cls.__name__)
        if saved is None:
            raise LeanformerError(f"{checkpoint} was not written by leanformer's training (no {cls.__name__} in "
                                  f"{TRAINER_STATE}); resume it with the Trainer that wrote it, or start afresh")
        saved_run = saved["args"]["run"]
        changed = sorted(k for k in set(run) | set(saved_run) if run.get(k) != saved_run.get(k))
        if changed:
            detail = ", ".join(f"{k}: checkpoint {saved_run.get(k)!r}, now {run.get(k)!r}" for k in changed[:6])
            raise LeanformerError(f"{checkpoint} belongs to a run with other arguments or another model ({detail}); "
                                  "rerun with the arguments it was started with, or use a new checkpoint directory "
                                  "(or delete it) to start afresh")
        return cls.from_state(saved)

    def add_loss(self, loss: torch.Tensor) -> None:
        loss = loss.detach()
        self._loss = loss if self._loss is None else self._loss + loss

    def on_step_begin(self, args, state, control, **kwargs):
        self._started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._loss is not None:  # reading the loss waits for the device, so the step's time includes its work
            self.losses.append(float(self._loss))
            self._loss = None
        if self._started is not None:
            self.seconds.append(time.perf_counter() - self._started)
            self._started = None


class RecordingTrainer(Trainer):
    """transformers.Trainer that keeps a StepLog of its optimizer steps (`self.step_log`)."""

    def __init__(self, *args, step_log: StepLog | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.step_log = step_log or StepLog()
        self.add_callback(self.step_log)

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.step_log.add_loss(loss)
        return loss


class ProgressBarOnly(ProgressCallback):
    """Trainer's progress bar without its log lines, for callers that report the results themselves."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        pass


def show_progress_bar_only(trainer: Trainer, enabled: bool) -> None:
    """Replace the trainer's log printing (PrinterCallback / ProgressCallback) by a bare bar, or nothing."""
    for cls in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cls)
    if enabled:
        trainer.add_callback(ProgressBarOnly)


class SaveAndStopOnSignal(TrainerCallback):
    """SIGTERM or a first Ctrl-C: the current optimizer step finishes, Trainer writes a checkpoint of
    it and stops (`stopped_by` names the signal). A second Ctrl-C interrupts at once. Handlers are
    installed for the duration of `train()` (main thread only) and the previous ones restored."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: str | None = None
        self.stopped_by: str | None = None
        self.stopped_at: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def on_train_begin(self, args, state, control, **kwargs):
        self.received = self.stopped_by = self.stopped_at = None
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)

    def _agreed(self, args) -> bool:
        """True when any process received a signal (all processes take part in the all-reduce)."""
        flag = self.received is not None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            t = torch.tensor([float(flag)], device=args.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            flag = bool(t.item())
        return flag

    def on_step_end(self, args, state, control, **kwargs):
        if self._agreed(args):
            control.should_save = True
            control.should_training_stop = True
            self.stopped_by = self.received or "a signal to another process"
            self.stopped_at = state.global_step

    def on_train_end(self, args, state, control, **kwargs):
        self.restore()

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on a signal after writing a checkpoint; rerunning the same call resumes it."""


# ---------------------------------------------------------------------------------------------
# Training you can see: the loss curve, periodic dev evaluation, a warning when nothing moves


def loss_curve(losses: list[float], every: int) -> dict:
    """{"every": k, "step": [...], "loss": [...]}: the mean training loss of each window of k steps
    (the last window may be shorter), indexed by the window's last step."""
    every = max(1, int(every))
    steps, values = [], []
    for start in range(0, len(losses), every):
        window = losses[start:start + every]
        steps.append(start + len(window))
        values.append(float(sum(window) / len(window)))
    return {"every": every, "step": steps, "loss": values}


class EvaluateEvery(TrainerCallback):
    """Evaluate on the dev split every `every` optimizer steps (and keep the results); `evaluate` is
    a function of the model returning the task's metrics dict."""

    def __init__(self, every: int, evaluate):
        if every <= 0:
            raise LeanformerError(f"--eval-steps must be a positive number of steps, got {every}")
        self.every, self.evaluate = every, evaluate
        self.history: list[dict] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 and state.global_step < state.max_steps:
            was_training = model.training
            model.eval()
            try:
                self.history.append({"step": state.global_step, **self.evaluate(model)})
            finally:
                model.train(was_training)


class StallWarning(TrainerCallback):
    """At a third of training, compare the recent loss with the starting loss; if it has not moved
    by `min_change` (relative), warn once with a concrete suggestion and keep the message."""

    def __init__(self, step_log: StepLog, learning_rate: float, min_change: float = 0.02, window: int = 10):
        self.step_log, self.learning_rate = step_log, learning_rate
        self.min_change, self.window = min_change, window
        self.message: str | None = None

    def on_step_end(self, args, state, control, **kwargs):
        checkpoint = max(2, state.max_steps // 3)
        losses = self.step_log.losses
        if self.message is not None or state.global_step != checkpoint or len(losses) < 2:
            return
        w = max(1, min(self.window, len(losses) // 3))
        start, recent = sum(losses[:w]) / w, sum(losses[-w:]) / w
        if abs(recent - start) <= self.min_change * max(abs(start), 1e-8):
            self.message = (
                f"the training loss has not moved from its start ({start:.4f} → {recent:.4f} over the first "
                f"{state.global_step} of {state.max_steps} steps). Try --learning-rate auto (a range test on "
                f"training batches), or a 3–10× larger --learning-rate than {self.learning_rate:g}; with an "
                "adapter, also check that --targets names layers that matter and that the task's labels are right")
            import warnings

            warnings.warn(self.message, stacklevel=1)


def plot_training(loss: dict, evaluations: list[dict], path, title: str = "") -> None:
    """PNG of the training-loss curve (and dev metrics, when evaluated periodically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(loss["step"], loss["loss"], "-o", ms=3, label=f"training loss (mean of {loss['every']} steps)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    if evaluations:
        metric = next(k for k in evaluations[0] if k != "step")
        ax2 = ax.twinx()
        ax2.plot([e["step"] for e in evaluations], [e[metric] for e in evaluations], "s--", color="C1", ms=4,
                 label=f"dev {metric}")
        ax2.set_ylabel(f"dev {metric}")
        ax2.legend(loc="upper right", fontsize=8)
    ax.legend(loc="upper left" if not evaluations else "lower left", fontsize=8)
    ax.set_title(title or "training loss")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

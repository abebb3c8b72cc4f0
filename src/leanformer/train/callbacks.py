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

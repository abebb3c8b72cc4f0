"""Healing a pruned model: a short LoRA fine-tune (Hu et al. 2021) on all linear layers, merged back.

After blocks are removed or replaced (compress.prune), a short parameter-efficient fine-tune
recovers much of the lost quality: Gromov et al. 2024, "The Unreasonable Ineffectiveness of the
Deeper Layers", heal their pruned models with QLoRA (abstract; their healing section). Fitted `LinearReplacement` maps train whole alongside. Causal LMs learn next-token prediction on the
given texts; other models (encoders) match a `teacher`'s last hidden state (mean squared error over
non-padding positions; e.g. the unpruned model). Training runs on transformers.Trainer; afterwards
the adapters are merged into the weights and removed, so the result is as ordinary as before.

Healing changes the base weights, so it is recorded on the model's transform stack
(Applied("heal", config, {})); `lf.load` only records it again, since the healed weights are what
`lf.save` stores.
"""
from __future__ import annotations

import tempfile
from typing import Sequence

import torch
from torch import nn
from transformers import TrainingArguments

from ..adapters.base import adapt, merge, strip_adapters
from ..adapters.lora import LoRA
from ..compress.prune import LinearReplacement
from ..errors import LeanformerError
from ..models import is_causal_lm
from ..stack import Applied, push
from ..text import pad_batch, token_chunks
from .callbacks import RecordingTrainer, show_progress_bar_only

LAST_LOSSES = 10  # heal_loss_last: mean over this many last steps


class DistillationTrainer(RecordingTrainer):
    """Trainer whose loss is the mean squared error between the model's last hidden state and a
    frozen teacher's on the same batch, over non-padding positions."""

    def __init__(self, *args, teacher: nn.Module, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher.to(self.args.device).eval()
        self.model_accepts_loss_kwargs = False  # the loss is a mean over this batch

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        with torch.no_grad():
            target = self.teacher(**inputs).last_hidden_state
        outputs = model(**inputs)
        hidden = outputs.last_hidden_state
        mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        loss = ((hidden - target).pow(2) * mask).sum() / (mask.sum() * hidden.shape[-1])
        return (loss, outputs) if return_outputs else loss


def heal(model: nn.Module, tokenizer, texts: Sequence[str], steps: int = 100, rank: int = 8,
         learning_rate: float = 1e-3, batch_size: int = 8, max_length: int = 256, teacher: nn.Module | None = None,
         seed: int = 0, progress: bool = True) -> dict[str, float]:
    """Heal `model` in place: LoRA of rank `rank` (alpha 2·rank) on all linear layers plus the fitted
    maps, `steps` AdamW steps at a constant learning rate, batches of `batch_size` token windows of
    at most `max_length` from `texts` in a seeded order; then merged and stripped.
    Returns {"heal_steps", "heal_loss_first", "heal_loss_last" (mean of the last 10 steps)}."""
    causal = is_causal_lm(model)
    if not causal and teacher is None:
        raise LeanformerError(f"healing {type(model).__name__} (not a causal LM) needs teacher= (the unpruned "
                              "model) to distil its last hidden state")
    if steps < 1:
        raise LeanformerError(f"heal steps must be positive, got {steps}")
    if batch_size < 1:
        raise LeanformerError(f"heal batch size must be positive, got {batch_size}")
    chunks = token_chunks(tokenizer, texts, max_length=max_length)
    if not chunks:
        raise LeanformerError("no healing text: the calibration texts produced no token windows")
    config = {"steps": steps, "rank": rank, "alpha": 2.0 * rank, "learning_rate": learning_rate,
              "batch_size": batch_size, "max_length": max_length, "seed": seed,
              "loss": "next-token" if causal else "teacher last hidden state (MSE)"}

    torch.manual_seed(seed)  # the LoRA initialisation
    adapt(model, LoRA(rank=rank, alpha=2.0 * rank, targets="all-linear"), name="heal")
    for m in model.modules():
        if isinstance(m, LinearReplacement):
            m.weight.requires_grad_(True)
            m.bias.requires_grad_(True)
    order = torch.randperm(len(chunks), generator=torch.Generator().manual_seed(seed)).tolist()
    windows = [{"input_ids": chunks[order[k % len(order)]]} for k in range(steps * batch_size)]

    def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
        batch = pad_batch(tokenizer, [r["input_ids"] for r in rows])
        if causal:
            batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        return batch

    device = next(model.parameters()).device
    with tempfile.TemporaryDirectory(prefix="leanformer-heal-") as scratch:
        args = TrainingArguments(output_dir=scratch, max_steps=steps, per_device_train_batch_size=batch_size,
                                 learning_rate=learning_rate, lr_scheduler_type="constant", weight_decay=0.0,
                                 max_grad_norm=0.0, optim="adamw_torch", seed=seed, save_strategy="no",
                                 logging_strategy="no", report_to="none", train_sampling_strategy="sequential",
                                 remove_unused_columns=False, use_cpu=device.type == "cpu", disable_tqdm=not progress)
        kwargs = dict(model=model, args=args, train_dataset=windows, data_collator=collate)
        trainer = RecordingTrainer(**kwargs) if causal else DistillationTrainer(**kwargs, teacher=teacher)
        show_progress_bar_only(trainer, progress)
        trainer.train()
    losses = trainer.step_log.losses
    model.eval()
    merge(model)
    strip_adapters(model)
    for p in model.parameters():
        p.requires_grad_(False)
    push(model, Applied("heal", config, {}))
    last = losses[-LAST_LOSSES:]
    return {"heal_steps": steps, "heal_loss_first": losses[0], "heal_loss_last": sum(last) / len(last)}


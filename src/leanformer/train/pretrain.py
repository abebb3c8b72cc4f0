"""Small-decoder pretraining from scratch, for the cosine-regulariser experiment of Razzhigaev et al.,
"Your Transformer is Secretly Linear" (ACL 2024, arXiv:2405.12250), who add a cosine-similarity
term to the loss when pretraining small models.

A Llama-shaped decoder (a few layers, dim 128) learns next-token prediction on a token stream, with
an optional CosineRegularizer added to the loss: `RegularizedTrainer`, a transformers.Trainer whose
compute_loss is CE + λ·Σ(1 − cos(h_i, h_{i−1})) over the residual stream. Batches are random
windows drawn up front from their own seeded generator and fed in order, so runs that differ only
in λ see exactly the same data in the same order and start from the same initial weights. Trainer
places it (a GPU when present) and `torchrun` / `accelerate launch` distribute it.
"""
from __future__ import annotations

import math
import statistics
import tempfile
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback, TrainingArguments

from ..capture import residual_stream
from ..errors import LeanformerError
from .callbacks import RecordingTrainer, show_progress_bar_only
from .regularizers import CosineRegularizer


@dataclass
class PretrainConfig:
    dim: int = 128
    n_layers: int = 6
    n_heads: int = 4
    hidden_dim: int = 344
    vocab_size: int = 512
    seq_len: int = 256
    batch_size: int = 16
    steps: int = 300
    learning_rate: float = 3e-3
    warmup_steps: int = 30
    weight_decay: float = 0.1
    lam: float = 0.0  # cosine regulariser weight (0 = off)
    seed: int = 0
    eval_every: int = 100
    eval_tokens: int = 32768  # validation tokens for perplexity
    profile_tokens: int = 4096  # validation tokens for the linearity profile


def make_model(cfg: PretrainConfig) -> LlamaForCausalLM:
    torch.manual_seed(cfg.seed)
    config = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim,
                         num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                         num_key_value_heads=cfg.n_heads, max_position_embeddings=cfg.seq_len,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config)


def split_stream(ids: torch.Tensor, val_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    cut = int(len(ids) * (1 - val_fraction))
    return ids[:cut], ids[cut:]


def _windows(stream: torch.Tensor, seq_len: int, max_tokens: int) -> torch.Tensor:
    n = min(len(stream) - 1, max_tokens) // seq_len
    if n < 1:
        raise LeanformerError(f"validation stream has {len(stream)} tokens; need more than seq_len={seq_len}")
    return stream[: n * seq_len + 1]


@torch.no_grad()
def validation_nll(model, stream: torch.Tensor, seq_len: int, max_tokens: int, batch_size: int = 16) -> float:
    """Mean next-token NLL over non-overlapping windows (each token predicted once, within its window)."""
    s = _windows(stream, seq_len, max_tokens)
    n = (len(s) - 1) // seq_len
    x = s[:-1].view(n, seq_len)
    y = s[1:].view(n, seq_len)
    device = next(model.parameters()).device
    total = 0.0
    for i in range(0, n, batch_size):
        logits = model(input_ids=x[i:i + batch_size].to(device)).logits.float()
        total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), y[i:i + batch_size].flatten().to(device),
                                                         reduction="sum"))
    return total / (n * seq_len)


@torch.no_grad()
def linearity_profile(model, stream: torch.Tensor, seq_len: int, max_tokens: int) -> dict[str, list[float]]:
    """Per block transition: linearity, linearity without residual, mean cosine (pre-final-norm states)."""
    from ..metrics import linearity, linearity_wo_residual

    s = _windows(stream, seq_len, max_tokens)
    n = (len(s) - 1) // seq_len
    device = next(model.parameters()).device
    with residual_stream(model) as states:
        model(input_ids=s[: n * seq_len].view(n, seq_len).to(device))
        hs = [h.reshape(-1, h.shape[-1]).float().cpu() for h in states]
    out = {"linearity": [], "linearity_wo_residual": [], "cosine": []}
    for X, Y in zip(hs[:-1], hs[1:]):
        out["linearity"].append(linearity(X, Y))
        out["linearity_wo_residual"].append(linearity_wo_residual(X, Y))
        out["cosine"].append(float(torch.nn.functional.cosine_similarity(X, Y, dim=1).mean()))
    return out


class RegularizedTrainer(RecordingTrainer):
    """Trainer on token windows (batch["input_ids"], seq_len + 1 tokens each) whose loss is the
    next-token cross-entropy plus `regularizer` over the residual stream h_0…h_L of the same forward
    pass. `last_ce` / `last_reg` hold the latest step's two terms (detached)."""

    def __init__(self, *args, regularizer: CosineRegularizer, **kwargs):
        super().__init__(*args, **kwargs)
        self.regularizer = regularizer
        self.model_accepts_loss_kwargs = False  # the loss is a mean over this batch's tokens
        self.last_ce = self.last_reg = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ids = inputs["input_ids"]
        with residual_stream(self.accelerator.unwrap_model(model)) as states:
            outputs = model(input_ids=ids[:, :-1], use_cache=False)
            ce = F.cross_entropy(outputs.logits.float().flatten(0, 1), ids[:, 1:].flatten())
            reg = self.regularizer(states) if self.regularizer.lam > 0 else torch.zeros((), device=ce.device)
        self.last_ce, self.last_reg = ce.detach(), reg.detach()
        loss = ce + reg
        return (loss, outputs) if return_outputs else loss

    def get_decay_parameter_names(self, model) -> list[str]:
        return [n for n, p in model.named_parameters() if p.ndim >= 2]  # weight decay on matrices only

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """Linear warmup whose first step already runs at lr/warmup (transformers' own warmup starts
        at 0), then cosine decay to 10 %. At lr 3e-3 this small model is sensitive to that one-step
        shift: starting at 0, the λ=0 run of the regulariser benchmark ends at perplexity 9.1 instead
        of 15.0, so the schedule is kept exactly as the runs recorded so far used it."""
        if self.lr_scheduler is None:
            warmup, total = self.args.warmup_steps, num_training_steps

            def factor(step: int) -> float:
                if step < warmup:
                    return (step + 1) / warmup
                t = (step - warmup) / max(1, total - warmup)
                return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer, factor)
        return self.lr_scheduler


class ValidationHistory(TrainerCallback):
    """Every `every` steps and at the last one: the step's training terms and the validation NLL."""

    def __init__(self, trainer: RegularizedTrainer, val_ids: torch.Tensor, cfg: PretrainConfig):
        self.trainer, self.val_ids, self.cfg = trainer, val_ids, cfg
        self.history: list[dict] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.cfg.eval_every and state.global_step != state.max_steps:
            return
        model.eval()
        nll = validation_nll(model, self.val_ids, self.cfg.seq_len, self.cfg.eval_tokens)
        model.train()
        self.history.append({"step": state.global_step, "train_ce": float(self.trainer.last_ce),
                             "train_reg": float(self.trainer.last_reg), "val_nll": nll,
                             "val_perplexity": math.exp(nll)})


def pretrain(cfg: PretrainConfig, train_ids: torch.Tensor, val_ids: torch.Tensor, progress: bool = True):
    """Train from scratch; returns (model, results dict with history, final profile and timings).

    AdamW (β = 0.9, 0.95; weight decay on matrices), linear warmup then cosine decay to 10 % of the
    learning rate, gradient norm clipped to 1."""
    if len(train_ids) <= cfg.seq_len + 1:
        raise LeanformerError(f"training stream has {len(train_ids)} tokens; need more than seq_len+1={cfg.seq_len + 1}")
    _windows(val_ids, cfg.seq_len, cfg.eval_tokens)  # a too-short validation stream fails before training
    model = make_model(cfg)
    data_gen = torch.Generator().manual_seed(cfg.seed + 1)  # the data order: identical whatever λ
    starts = torch.randint(0, len(train_ids) - cfg.seq_len - 1, (cfg.steps * cfg.batch_size,), generator=data_gen)
    windows = [{"input_ids": train_ids[s:s + cfg.seq_len + 1]} for s in starts.tolist()]
    with tempfile.TemporaryDirectory(prefix="leanformer-pretrain-") as scratch:
        args = TrainingArguments(
            output_dir=scratch, max_steps=cfg.steps, per_device_train_batch_size=cfg.batch_size,
            learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay, adam_beta1=0.9, adam_beta2=0.95,
            max_grad_norm=1.0, optim="adamw_torch", warmup_steps=cfg.warmup_steps, seed=cfg.seed,
            train_sampling_strategy="sequential", save_strategy="no", logging_strategy="no", report_to="none",
            remove_unused_columns=False, disable_tqdm=not progress)
        trainer = RegularizedTrainer(model=model, args=args, train_dataset=windows,
                                     regularizer=CosineRegularizer(cfg.lam))
        history = ValidationHistory(trainer, val_ids, cfg)
        trainer.add_callback(history)  # after the StepLog: validation is not part of a step's time
        show_progress_bar_only(trainer, progress)
        trainer.train()
    model.eval()
    final = history.history[-1]
    results = {"config": asdict(cfg), "history": history.history, "val_nll": final["val_nll"],
               "val_perplexity": final["val_perplexity"],
               "profile": linearity_profile(model, val_ids, cfg.seq_len, cfg.profile_tokens),
               "train_seconds_per_step": statistics.median(trainer.step_log.seconds),
               "total_params": sum(p.numel() for p in model.parameters())}
    return model, results

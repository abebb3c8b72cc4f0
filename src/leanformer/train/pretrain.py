"""Small-decoder pretraining from scratch, for the cosine-regulariser experiment (methods.md §3.2).

A Llama-shaped decoder (a few layers, dim 128) learns next-token prediction on a token stream, with
an optional CosineRegularizer added to the loss. Batches are random windows drawn from their own
seeded generator, so runs that differ only in λ see exactly the same data in the same order and
start from the same initial weights. Runs through `accelerate` (CPU here; a GPU when present).
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from ..errors import LeanformerError
from ..capture import residual_stream
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


def make_model(cfg: PretrainConfig):
    from transformers import LlamaConfig, LlamaForCausalLM

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


def pretrain(cfg: PretrainConfig, train_ids: torch.Tensor, val_ids: torch.Tensor, progress: bool = True):
    """Train from scratch; returns (model, results dict with history, final profile and timings)."""
    from accelerate import Accelerator

    if len(train_ids) <= cfg.seq_len + 1:
        raise LeanformerError(f"training stream has {len(train_ids)} tokens; need more than seq_len+1={cfg.seq_len + 1}")
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    model = make_model(cfg)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.learning_rate, betas=(0.9, 0.95))

    def lr_at(step):  # linear warmup, cosine decay to 10 %
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model, opt, sched = accelerator.prepare(model, opt, sched)
    reg = CosineRegularizer(cfg.lam)
    data_gen = torch.Generator().manual_seed(cfg.seed + 1)  # the data order: identical whatever λ
    history, step_times = [], []
    bar = tqdm(range(cfg.steps), desc=f"pretrain λ={cfg.lam}", disable=not progress)
    for step in bar:
        model.train()
        starts = torch.randint(0, len(train_ids) - cfg.seq_len - 1, (cfg.batch_size,), generator=data_gen)
        chunk = torch.stack([train_ids[s:s + cfg.seq_len + 1] for s in starts.tolist()]).to(accelerator.device)
        t0 = time.perf_counter()
        with residual_stream(model) as states:
            logits = model(input_ids=chunk[:, :-1]).logits
            ce = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), chunk[:, 1:].flatten())
            r = reg(states) if cfg.lam > 0 else torch.zeros((), device=ce.device)
        accelerator.backward(ce + r)
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step_times.append(time.perf_counter() - t0)
        ce, r = ce.detach(), r.detach()
        bar.set_postfix(ce=f"{float(ce):.3f}", reg=f"{float(r):.3f}")
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            model.eval()
            nll = validation_nll(model, val_ids, cfg.seq_len, cfg.eval_tokens)
            history.append({"step": step + 1, "train_ce": float(ce), "train_reg": float(r), "val_nll": nll,
                            "val_perplexity": math.exp(nll)})
    model.eval()
    model = accelerator.unwrap_model(model)
    final = history[-1]
    results = {"config": asdict(cfg), "history": history, "val_nll": final["val_nll"],
               "val_perplexity": final["val_perplexity"],
               "profile": linearity_profile(model, val_ids, cfg.seq_len, cfg.profile_tokens),
               "train_seconds_per_step": statistics.median(step_times),
               "total_params": sum(p.numel() for p in model.parameters())}
    return model, results

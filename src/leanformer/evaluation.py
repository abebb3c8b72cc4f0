"""Evaluation: task metrics, causal-LM perplexity, and sentence-embedding agreement."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .configs import check_positive, with_overrides
from .errors import LeanformerError
from .models import classifier_head_name, is_causal_lm
from .tasks import Task
from .text import pad_batch

SPLITS = ("dev", "train")


def task_metrics(predictions, labels, names: Sequence[str]) -> dict[str, float]:
    """Named GLUE metrics: accuracy, f1 (binary, positive class 1), mcc, pearson, spearman."""
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import f1_score, matthews_corrcoef

    p, y = np.asarray(predictions), np.asarray(labels)
    fns = {"accuracy": lambda: float((p == y).mean()),
           "f1": lambda: float(f1_score(y, p)),
           "mcc": lambda: float(matthews_corrcoef(y, p)),
           "pearson": lambda: float(pearsonr(p, y)[0]),
           "spearman": lambda: float(spearmanr(p, y)[0])}
    unknown = [n for n in names if n not in fns]
    if unknown:
        raise LeanformerError(f"unknown metric(s) {unknown}; known: {sorted(fns)}")
    return {n: fns[n]() for n in names}


def _encode_pairs(tokenizer, a: Sequence[str], b: Sequence[str] | None, max_length: int):
    return tokenizer(list(a), list(b) if b is not None else None, truncation=True, max_length=max_length,
                     padding=True, return_tensors="pt")


@torch.no_grad()
def predict(model, tokenizer, text_a: Sequence[str], text_b: Sequence[str] | None = None,
            batch_size: int = 64, max_length: int = 128, regression: bool = False) -> np.ndarray:
    """Class ids (or regression scores) of a sequence-classification model."""
    device = next(model.parameters()).device
    out = []
    for i in tqdm(range(0, len(text_a), batch_size), desc="evaluate", leave=False, disable=len(text_a) <= batch_size):
        enc = _encode_pairs(tokenizer, text_a[i:i + batch_size], None if text_b is None else text_b[i:i + batch_size],
                            max_length)
        logits = model(**{k: v.to(device) for k, v in enc.items()}).logits
        out.append(logits.squeeze(-1).float().cpu() if regression else logits.argmax(-1).cpu())
    return torch.cat(out).numpy()


def evaluate_task(model, tokenizer, task: Task, split: str = "dev", batch_size: int = 64, max_length: int = 128,
                  max_samples: int | None = None) -> dict[str, float]:
    if classifier_head_name(model) is None:
        raise LeanformerError(f"{type(model).__name__} has no classification head; fine-tune it first "
                              "(leanformer finetune MODEL --task ...)")
    data = getattr(task, split)
    n = len(data) if max_samples is None else min(max_samples, len(data))
    preds = predict(model, tokenizer, data.text_a[:n], None if data.text_b is None else data.text_b[:n],
                    batch_size, max_length, regression=task.is_regression)
    return task_metrics(preds, data.labels[:n], task.metrics)


@torch.no_grad()
def perplexity(model, tokenizer, texts: Sequence[str], max_length: int | None = None, stride: int | None = None,
               batch_size: int = 8) -> dict[str, float]:
    """Sliding-window perplexity of a causal LM over the token stream of `texts` (each tokenized with
    the tokenizer's special tokens, e.g. BOS, then concatenated). Windows of `max_length` advance by
    `stride`; only tokens not scored by an earlier window count, so every token after the first is
    predicted exactly once, with up to max_length − stride tokens of context carried over."""
    if not is_causal_lm(model):
        raise LeanformerError(f"perplexity needs a causal LM; {type(model).__name__} is not one "
                              "(for encoders, compare embeddings with --reference)")
    max_length = max_length or min(getattr(model.config, "max_position_embeddings", 1024), 1024)
    stride = stride or max_length // 2
    if not 0 < stride <= max_length:
        raise LeanformerError(f"stride must be in 1..max_length ({max_length}), got {stride}")
    ids: list[int] = []
    for i in range(0, len(texts), 256):
        for seq in tokenizer(list(texts[i:i + 256]))["input_ids"]:
            ids.extend(seq)
    if len(ids) < 2:
        raise LeanformerError("text too short for perplexity: need at least 2 tokens")
    stream = torch.tensor(ids)
    windows, prev_end = [], 0
    for begin in range(0, len(ids), stride):
        end = min(begin + max_length, len(ids))
        n_new = end - max(prev_end, begin + 1)  # the first token of the stream has no prediction
        if n_new > 0:
            windows.append((begin, end, n_new))
        prev_end = end
        if end == len(ids):
            break
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for i in tqdm(range(0, len(windows), batch_size), desc="perplexity", leave=False):
        group = windows[i:i + batch_size]
        chunks = [stream[b:e].tolist() for b, e, _ in group]
        batch = pad_batch(tokenizer, chunks)
        labels = torch.full_like(batch["input_ids"], -100)
        for row, (b, e, n_new) in enumerate(group):
            labels[row, e - b - n_new:e - b] = batch["input_ids"][row, e - b - n_new:e - b]
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
        shift_logits, shift_labels = logits[:, :-1].float(), labels[:, 1:].to(device)
        loss = torch.nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]),
                                                 shift_labels.reshape(-1), ignore_index=-100, reduction="sum")
        nll += float(loss)
        count += int((shift_labels != -100).sum())
    return {"perplexity": math.exp(nll / count), "nll_per_token": nll / count, "n_tokens": count}


@torch.no_grad()
def sentence_embeddings(model, tokenizer, texts: Sequence[str], batch_size: int = 64, max_length: int = 128) -> torch.Tensor:
    """Mean-pooled last hidden state over valid tokens (sentence-transformers' pooling for MiniLM)."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[i:i + batch_size]), truncation=True, max_length=max_length, padding=True,
                        return_tensors="pt").to(device)
        h = model(**enc, output_hidden_states=True).hidden_states[-1].float()
        mask = enc["attention_mask"].unsqueeze(-1).float()
        out.append(((h * mask).sum(1) / mask.sum(1)).cpu())
    return torch.cat(out)


def embedding_cosine(model_a, model_b, tokenizer, texts: Sequence[str], batch_size: int = 64,
                     max_length: int = 128) -> dict[str, float]:
    """Mean (and min) cosine between the two models' sentence embeddings of the same texts."""
    ea = sentence_embeddings(model_a, tokenizer, texts, batch_size, max_length)
    eb = sentence_embeddings(model_b, tokenizer, texts, batch_size, max_length)
    cos = torch.nn.functional.cosine_similarity(ea, eb, dim=1)
    return {"embedding_cosine": float(cos.mean()), "embedding_cosine_min": float(cos.min()), "n_texts": len(texts)}


@dataclass
class EvalConfig:
    max_seq_length: int = field(default=128, metadata={
        "help": "tokens per sequence (perplexity: the window length)"})
    batch_size: int = field(default=32, metadata={"help": "sequences (perplexity: windows) per forward pass"})
    max_eval_samples: int | None = field(default=None, metadata={
        "help": "evaluate on the first N examples / texts (none = all)"})
    stride: int | None = field(default=None, metadata={
        "help": "perplexity: window stride (none = half the window)"})
    split: str = field(default="dev", metadata={"help": "task split to evaluate", "choices": SPLITS})

    def __post_init__(self):
        check_positive(self, "max_seq_length", "batch_size", "max_eval_samples", "stride")
        if self.split not in SPLITS:
            raise LeanformerError(f"split {self.split!r} is not one of {', '.join(SPLITS)}")


def evaluate(model, tokenizer, config: EvalConfig | None = None, *, task: Task | None = None,
             texts: Sequence[str] | None = None, reference=None, **overrides) -> dict:
    """One verb over the three measures: with `task`, its metrics (evaluate_task); with `texts`, a
    causal LM's perplexity, or for an encoder the cosine of its sentence embeddings to those of
    `reference` (a model, e.g. the uncompressed one). Keywords override EvalConfig fields."""
    config = with_overrides(EvalConfig, config, overrides)
    if (task is None) == (texts is None):
        raise LeanformerError("give exactly one of task= or texts= (--task or --text/--dataset)")
    n = config.max_eval_samples
    if task is not None:
        result = evaluate_task(model, tokenizer, task, split=config.split, batch_size=config.batch_size,
                               max_length=config.max_seq_length, max_samples=n)
        return {"task": task.name, **result}
    texts = list(texts)[:n]
    if is_causal_lm(model):
        return perplexity(model, tokenizer, texts, max_length=config.max_seq_length, stride=config.stride,
                          batch_size=config.batch_size)
    if reference is None:
        raise LeanformerError(f"{type(model).__name__} is an encoder: pass a reference model (--reference MODEL) "
                              "to compare sentence embeddings with (perplexity needs a causal LM)")
    return embedding_cosine(model, reference, tokenizer, texts, config.batch_size, config.max_seq_length)

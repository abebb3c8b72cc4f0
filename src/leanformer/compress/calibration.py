"""Calibration shared by the methods that read a model's activations (lf.plan, GPTQ): padded token
batches from texts, a Task or token batches, and one pass that gathers the Gram matrix XᵀX of every
target layer's inputs (and, on request, each block's block influence)."""
from __future__ import annotations

import contextlib

import torch
from torch import nn
from tqdm.auto import tqdm

from ..capture import _valid_tokens, residual_stream
from ..errors import LeanformerError
from ..tasks import Task, calibration_chunks
from ..text import batches


def calibration_batches(calibration, tokenizer, config, purpose: str) -> list[dict[str, torch.Tensor]]:
    """Padded batches (about `config.tokens` tokens in windows of at most `config.max_seq_length`,
    `config.batch_size` per batch) from a Task (its train split), texts, (text_a, text_b) pairs, or token batches
    (dicts with input_ids and optionally attention_mask) used as given."""
    if isinstance(calibration, dict):
        calibration = [calibration]
    if isinstance(calibration, str):
        calibration = [calibration]
    if not isinstance(calibration, Task):
        calibration = [c for c in (calibration or []) if not (isinstance(c, str) and not c.strip())]
    if isinstance(calibration, Task) and len(calibration.train) == 0:
        calibration = []
    if not isinstance(calibration, Task) and not calibration:
        raise LeanformerError(f"{purpose} needs calibration input (the inputs each layer sees): calibration= a list "
                              "of texts, a Task (leanformer.tasks.load_task; its train split), or token batches (dicts "
                              "with input_ids and attention_mask); the one given is empty")
    if not isinstance(calibration, Task) and isinstance(calibration[0], dict):
        out = []
        for b in calibration:
            if "input_ids" not in b:
                raise LeanformerError(f"a calibration token batch needs input_ids; got keys {sorted(b)}")
            ids = torch.as_tensor(b["input_ids"])
            ids = ids[None] if ids.dim() == 1 else ids
            mask = torch.as_tensor(b.get("attention_mask", torch.ones_like(ids))).reshape(ids.shape)
            out.append({"input_ids": ids, "attention_mask": mask})
        return out
    if tokenizer is None:
        raise LeanformerError(f"{purpose} needs the model's tokenizer (tokenizer=) to read calibration text; or pass "
                              "token batches (dicts with input_ids and attention_mask)")
    chunks = calibration_chunks(tokenizer, calibration, config.max_seq_length, config.tokens, purpose)
    return list(batches(tokenizer, chunks, config.batch_size))


@torch.no_grad()
def measure_inputs(model: nn.Module, modules: dict[str, nn.Module], batches_: list[dict], want_influence: bool,
                   progress: bool, purpose: str
                   ) -> tuple[dict[str, torch.Tensor], list[float] | None, int, list[list[str]]]:
    """(XᵀX per layer in float64 on the CPU, block influence per block or None, calibration tokens, the
    layers grouped by the input tensor they read in the order the forward pass reaches them), in eval
    mode (dropout would add noise to every Gram matrix)."""
    grams: dict[str, torch.Tensor] = {}
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # this batch: id(input) → (input, its Gram)
    mask_now: list[torch.Tensor] = []
    stages: dict[int, list[str]] = {}  # the first batch's id(input) → its layers (seen keeps every id unique)

    def hook(name):
        def grab(_module, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            if id(x) not in seen:  # q, k, v (gate, up) read one tensor: one Gram for all of them
                v = _valid_tokens(x, mask_now[0], name).detach().to("cpu", torch.float64)
                seen[id(x)] = (x, v.T @ v)
            g = seen[id(x)][1]
            if name not in grams:  # first call of this layer: the first batch
                stages.setdefault(id(x), []).append(name)
            grams[name] = grams[name] + g if name in grams else g.clone()
        return grab

    handles = [m.register_forward_pre_hook(hook(n), with_kwargs=True) for n, m in modules.items()]
    device = next(model.parameters()).device
    cos_sums, n_tokens = None, 0
    was_training = model.training
    model.eval()
    try:
        with (residual_stream(model) if want_influence else contextlib.nullcontext([])) as states:
            for batch in tqdm(batches_, desc=f"{purpose}: calibrate", disable=not progress, leave=False):
                mask = batch["attention_mask"].to(device).bool()
                mask_now[:] = [mask]
                model(input_ids=batch["input_ids"].to(device), attention_mask=mask.long())
                seen.clear()
                n_tokens += int(mask.sum())
                if want_influence:
                    h = [_valid_tokens(s, mask, f"hidden state {i}").double() for i, s in enumerate(states)]
                    cos = [float(torch.nn.functional.cosine_similarity(a, b, dim=1).sum()) for a, b in zip(h, h[1:])]
                    cos_sums = cos if cos_sums is None else [x + y for x, y in zip(cos_sums, cos)]
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    missing = [n for n in modules if n not in grams]
    if missing:
        raise LeanformerError(f"layers {missing[:5]} saw no input in the calibration forward passes (they do not run "
                              "on input_ids alone); leave them out with targets=")
    if n_tokens == 0:
        raise LeanformerError("the calibration batches hold no tokens (every attention_mask entry is 0)")
    influence = None if cos_sums is None else [1.0 - c / n_tokens for c in cos_sums]  # = Profile block_influence
    return grams, influence, n_tokens, list(stages.values())

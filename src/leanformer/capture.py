"""Hidden states h_0…h_L (and MLP activations) via hooks, padding removed, streamed in batches.

Hooks on the block list (leanformer.architectures.find_blocks) give the residual stream uniformly
for every architecture: h_0 is the input of block 0 (embedding output), h_i the output of block i−1. For decoders this is the
pre-final-norm residual — unlike `output_hidden_states`, whose last entry often has the final norm
applied (the states Razzhigaev et al. 2024 measure linearity on).
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from torch import nn

from .architectures import find_blocks, find_mlp_activation
from .errors import LeanformerError
from .text import batches

__all__ = ["find_blocks", "residual_stream", "capture", "iter_hidden_states"]


def _first_tensor(output):
    return output if isinstance(output, torch.Tensor) else output[0]


@contextlib.contextmanager
def residual_stream(model: nn.Module) -> Iterator[list]:
    """Within the block, every forward fills the yielded list with [h_0, …, h_L] as the blocks see
    them (autograd kept): h_0 is block 0's input, h_i block i−1's output."""
    blocks, _ = find_blocks(model)
    states: list = [None] * (len(blocks) + 1)

    def grab_input(_module, args, kwargs):
        states[0] = args[0] if args else kwargs["hidden_states"]

    handles = [blocks[0].register_forward_pre_hook(grab_input, with_kwargs=True)]
    for i, block in enumerate(blocks):
        handles.append(block.register_forward_hook(lambda _m, _a, out, i=i: states.__setitem__(i + 1, _first_tensor(out))))
    try:
        yield states
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def capture(model: nn.Module, batch: dict[str, torch.Tensor], mlp_eps: float | None = None):
    """One padded batch → (states, last_token, mlp_near_zero).

    states: [h_0, …, h_L], each (n_valid_tokens, d) float32 with padded positions removed;
    last_token: row index (into the flattened valid tokens) of each sequence's last token;
    mlp_near_zero: with `mlp_eps`, per block (count of valid MLP activations with |a| ≤ mlp_eps,
    count of valid activations), reduced inside the hook so the (tokens × d_ff) activations are
    never kept; None when not requested or no activation module is found."""
    blocks, path = find_blocks(model)
    counts: list[tuple[int, int] | None] = [None] * len(blocks)
    device = next(model.parameters()).device
    mask = batch["attention_mask"].to(device).bool()

    def count_near_zero(i, name, out):
        valid = _valid_tokens(out, mask, name)
        # in row slices: small temporaries are reused by the allocator, where whole-batch
        # (tokens × d_ff) ones cost a fresh mapping each (≈2× slower on minilm)
        near = sum(int((valid[s:s + 1024].abs() <= mlp_eps).sum()) for s in range(0, valid.shape[0], 1024))
        counts[i] = (near, valid.numel())

    handles = []
    for i, block in enumerate(blocks):
        act = find_mlp_activation(model, block) if mlp_eps is not None else None
        if act is not None:
            name = f"{path}.{i}." + next(n for n, m in block.named_modules() if m is act)
            handles.append(act.register_forward_hook(lambda _m, _a, out, i=i, name=name: count_near_zero(i, name, out)))
    try:
        with residual_stream(model) as outputs:
            getattr(model, "base_model", model)(input_ids=batch["input_ids"].to(device), attention_mask=mask.long())
    finally:
        for h in handles:
            h.remove()
    if any(o is None for o in outputs):
        raise LeanformerError(f"{type(model).__name__}: its blocks did not all run; cannot capture hidden states")
    states = [_valid_tokens(o, mask, f"{path}.{max(i - 1, 0)} ({'input' if i == 0 else 'output'})").float()
              for i, o in enumerate(outputs)]
    lengths = mask.sum(dim=1)
    last_token = torch.cumsum(lengths, 0) - 1
    return states, last_token, (counts if all(c is not None for c in counts) else None)


def _valid_tokens(t: torch.Tensor, mask: torch.Tensor, name: str) -> torch.Tensor:
    """(n_valid_tokens, features) rows of a (batch, seq, …) tensor, or of one whose tokens are already
    flattened to (batch·seq, …) as OPT's MLP does; any other shape names the module."""
    if t.dim() >= 2 and tuple(t.shape[:2]) == tuple(mask.shape):
        return t[mask].reshape(int(mask.sum()), -1)
    if t.dim() >= 1 and t.shape[0] == mask.numel():
        return t[mask.reshape(-1)].reshape(int(mask.sum()), -1)
    raise LeanformerError(
        f"{name}: output of shape {tuple(t.shape)} does not line up with the batch's {tuple(mask.shape)} "
        "(batch, sequence) tokens, nor with them flattened; cannot tell which entries belong to which token")


def iter_hidden_states(model: nn.Module, tokenizer, chunks: Sequence[Sequence[int]], batch_size: int = 16,
                       mlp_eps: float | None = None) -> Iterator[tuple[list[torch.Tensor], torch.Tensor, list | None]]:
    for batch in batches(tokenizer, chunks, batch_size):
        yield capture(model, batch, mlp_eps=mlp_eps)

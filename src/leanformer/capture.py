"""Hidden states h_0…h_L (and MLP activations) via hooks, padding removed, streamed in batches.

Hooks on the block list give the residual stream uniformly for every architecture: h_0 is the
input of block 0 (embedding output), h_i the output of block i−1. For decoders this is the
pre-final-norm residual — unlike `output_hidden_states`, whose last entry often has the final norm
applied (the states Razzhigaev et al. 2024 measure linearity on).
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from torch import nn

from .text import batches
from .errors import LeanformerError

# Where common architectures keep their blocks (the first that exists wins), then a generic search.
BLOCK_PATHS = ("model.layers", "model.decoder.layers", "encoder.layer", "transformer.h", "gpt_neox.layers",
               "transformer.layers", "layers", "h", "blocks", "encoder.layers", "decoder.layers")
ACTIVATION_NAMES = ("intermediate_act_fn", "act_fn", "activation_fn", "act")


def _get(module: nn.Module, path: str):
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def find_blocks(model: nn.Module) -> tuple[nn.ModuleList, str]:
    """The transformer's block list and its attribute path (relative to `model`)."""
    for root_name in ("", "base_model."):
        root = model if not root_name else getattr(model, "base_model", None)
        if root is None:
            continue
        for path in BLOCK_PATHS:
            blocks = _get(root, path)
            if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
                return blocks, root_name + path
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and n_layers and len(module) == n_layers:
            return module, name
    raise LeanformerError(
        f"cannot find the transformer block list of {type(model).__name__}: looked for "
        f"{', '.join(BLOCK_PATHS)} and any nn.ModuleList of config.num_hidden_layers ({n_layers}) modules")


def find_mlp_activation(block: nn.Module) -> nn.Module | None:
    for name, module in block.named_modules():
        if name.rsplit(".", 1)[-1] in ACTIVATION_NAMES and not list(module.children()):
            return module
    return None


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
    blocks, _ = find_blocks(model)
    counts: list[tuple[int, int] | None] = [None] * len(blocks)
    device = next(model.parameters()).device
    mask = batch["attention_mask"].to(device).bool()

    def count_near_zero(i, out):
        valid = out[mask]
        counts[i] = (int((valid.abs() <= mlp_eps).sum()), valid.numel())

    handles = []
    for i, block in enumerate(blocks):
        act = find_mlp_activation(block) if mlp_eps is not None else None
        if act is not None:
            handles.append(act.register_forward_hook(lambda _m, _a, out, i=i: count_near_zero(i, out)))
    try:
        with residual_stream(model) as outputs:
            getattr(model, "base_model", model)(input_ids=batch["input_ids"].to(device), attention_mask=mask.long())
    finally:
        for h in handles:
            h.remove()
    if any(o is None for o in outputs):
        raise LeanformerError(f"{type(model).__name__}: its blocks did not all run; cannot capture hidden states")
    flat = mask.reshape(-1)
    states = [o.reshape(-1, o.shape[-1])[flat].float() for o in outputs]
    lengths = mask.sum(dim=1)
    last_token = torch.cumsum(lengths, 0) - 1
    return states, last_token, (counts if all(c is not None for c in counts) else None)


def iter_hidden_states(model: nn.Module, tokenizer, chunks: Sequence[Sequence[int]], batch_size: int = 16,
                       mlp_eps: float | None = None) -> Iterator[tuple[list[torch.Tensor], torch.Tensor, list | None]]:
    for batch in batches(tokenizer, chunks, batch_size):
        yield capture(model, batch, mlp_eps=mlp_eps)

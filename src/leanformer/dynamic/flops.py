"""Dense FLOPs per token of a transformer, counted from its layers' shapes: the reference every
dynamic-inference cost (`leanformer.dynamic.cost`) is a fraction of.

Counting rule: one multiply-add = 2 FLOPs. A Linear-like layer costs 2·in·out per token; biases,
activations, norms, softmax and residual additions are left out (they are O(width), not
O(width²), and the same in the dense and the dynamic model). Attention scores cost
2·keys·d_qk (q·kᵀ) + 2·keys·d_v (weights·v) per token and layer, where keys is seq_len for an
encoder and (seq_len + 1) / 2 on average under a causal mask.

What is counted where:
  blocks[i]["attention"]  q, k, v, o projections of block i (a fused qkv layer once) + its scores
  blocks[i]["mlp"]        mlp_in, mlp_gate, mlp_out of block i (see architectures.ROLES)
  "attention", "mlp"      their sums over the blocks
  "total"                 attention + mlp: the transformer body, embeddings and head excluded
                          (an embedding lookup costs no FLOPs; the head is the same for dense and
                          dynamic models, and a classifier runs once per sequence, not per token)
  "head"                  the output layer per token, for reference: an LM head's 2·d·vocab, a
                          classification head's cost divided by seq_len; not part of "total"

A module inside a block that stands in for the block's dense MLP (a moefied MLP, leanformer.dynamic.moe)
carries `dense_mlp_flops`, the per-token cost of the MLP it replaced: it is counted as that, so the
reference stays the dense model's cost after the transform.
"""
from __future__ import annotations

from torch import nn

from ..architectures import find_blocks, role_layers
from ..errors import LeanformerError
from ..models import is_causal_lm
from ..targets import head_modules, linear_layers, linear_shape

ATTENTION_ROLES = ("q", "k", "v", "o")
MLP_ROLES = ("mlp_in", "mlp_gate", "mlp_out")
DENSE_MLP_ATTR = "dense_mlp_flops"  # set by modules that replace a block's dense MLP


def linear_flops(module: nn.Module) -> int:
    """Per-token FLOPs of one Linear-like layer: 2·in·out."""
    in_f, out_f = linear_shape(module)
    return 2 * in_f * out_f


def _layers_by_block(model: nn.Module, roles: tuple[str, ...], prefix: str, n_blocks: int) -> list[list[str]]:
    """Names of the layers playing any of `roles`, per block (a role no block has is skipped: BERT has no
    mlp_gate; a fused layer playing several roles appears once)."""
    out: list[list[str]] = [[] for _ in range(n_blocks)]
    for role in roles:
        try:
            names = role_layers(model, (role,))
        except LeanformerError:
            continue
        for name in names:
            index = name[len(prefix) + 1:].split(".", 1)[0]
            if name.startswith(prefix + ".") and index.isdigit() and name not in out[int(index)]:
                out[int(index)].append(name)
    return out


def attention_score_flops(model: nn.Module, seq_len: int) -> float:
    """Per-token FLOPs of one block's attention scores and weighted sum at `seq_len` tokens."""
    config = getattr(model, "config", None)
    heads = int(getattr(config, "num_attention_heads", 0) or 0)
    hidden = int(getattr(config, "hidden_size", 0) or 0)
    if not heads or not hidden:
        raise LeanformerError(f"{type(model).__name__}'s config has no num_attention_heads / hidden_size: "
                              "cannot count its attention-score FLOPs")
    head_dim = int(getattr(config, "head_dim", 0) or hidden // heads)
    keys = (seq_len + 1) / 2 if is_causal_lm(model) else float(seq_len)
    return 2 * keys * heads * head_dim * 2  # q·kᵀ and weights·v, same width each


def dense_flops_per_token(model: nn.Module, seq_len: int) -> dict:
    """FLOPs per token of the dense model at `seq_len` tokens per sequence (see the module doc for
    what each key counts)."""
    if int(seq_len) < 1:
        raise LeanformerError(f"seq_len must be a positive number of tokens, got {seq_len}")
    blocks, prefix = find_blocks(model)
    layers = linear_layers(model)
    attention_names = _layers_by_block(model, ATTENTION_ROLES, prefix, len(blocks))
    mlp_names = _layers_by_block(model, MLP_ROLES, prefix, len(blocks))
    scores = attention_score_flops(model, int(seq_len))
    rows = []
    for i, block in enumerate(blocks):
        attention = sum(linear_flops(layers[n]) for n in attention_names[i])
        replaced = [m for m in block.modules() if hasattr(m, DENSE_MLP_ATTR)]
        mlp = (sum(getattr(m, DENSE_MLP_ATTR) for m in replaced) if replaced
               else sum(linear_flops(layers[n]) for n in mlp_names[i]))
        rows.append({"attention": float(attention + (scores if attention_names[i] else 0.0)), "mlp": float(mlp)})
    head = 0.0
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if is_causal_lm(model) and out_emb is not None:
        head = float(linear_flops(out_emb))
    else:
        for name in head_modules(model):
            head += sum(linear_flops(m) for m in linear_layers(getattr(model, name)).values()) / int(seq_len)
    attention_total = sum(r["attention"] for r in rows)
    mlp_total = sum(r["mlp"] for r in rows)
    return {"seq_len": int(seq_len), "blocks": rows, "attention": attention_total, "mlp": mlp_total,
            "total": attention_total + mlp_total, "head": head}

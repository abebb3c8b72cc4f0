"""inspect(): per-layer geometry of any HF model on any text (methods.md §1).

Capture h_0…h_L batch by batch and feed a streaming accumulator, so memory is O(L·d²) whatever the
token count; intrinsic dimension uses a seeded sample of `sample_size` token positions. Windows are
batched shortest-first (as HF's group_by_length) so little compute goes to padding; no metric
depends on the order.
"""
from __future__ import annotations

import time

import numpy as np
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from tqdm.auto import tqdm

from .capture import capture, find_blocks
from .text import pad_batch, token_chunks
from .errors import LeanformerError
from .metrics import GeometryAccumulator, sample_positions
from .models import head_kind, model_label

LAYER_METRICS = ("anisotropy", "intrinsic_dim", "mlp_sparsity")
TRANSITION_METRICS = ("linearity", "linearity_wo_residual", "block_influence", "angular_distance")
MLP_SPARSITY_EPS = 1e-2  # |a| ≤ this counts as (near-)zero; see metrics.mlp_sparsity


@dataclass
class Profile:
    """Per-layer metrics: `layers[i]` describes h_i, `transitions[i]` the block h_i → h_{i+1}."""
    model: str
    n_tokens: int
    hidden_size: int
    layers: list[dict]
    transitions: list[dict]
    info: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict) -> "Profile":
        return cls(**{k: obj[k] for k in ("model", "n_tokens", "hidden_size", "layers", "transitions")},
                   info=obj.get("info", {}))

    def table(self) -> str:
        head = (f"{'layer':>5} {'anisotropy':>10} {'intr.dim':>8} {'mlp_sparse':>10} │ {'block':>6} "
                f"{'linearity':>9} {'lin-resid':>9} {'blk.infl':>8} {'angular':>7}")
        rows = [head, "─" * len(head)]
        for i, layer in enumerate(self.layers):
            sparsity = "—" if layer["mlp_sparsity"] is None else f"{layer['mlp_sparsity']:.3f}"
            dim = "—" if layer["intrinsic_dim"] is None else f"{layer['intrinsic_dim']:.2f}"
            left = f"{i:>5} {layer['anisotropy']:>10.4f} {dim:>8} {sparsity:>10}"
            if i < len(self.transitions):
                t = self.transitions[i]
                left += (f" │ {f'{i}→{i + 1}':>6} {t['linearity']:>9.4f} {t['linearity_wo_residual']:>9.4f} "
                         f"{t['block_influence']:>8.4f} {t['angular_distance']:>7.4f}")
            rows.append(left)
        return "\n".join(rows)


def inspect(model, tokenizer, texts: Sequence[str], tokens: int = 16384, max_length: int = 128, batch_size: int = 64,
            seed: int = 0, sample_size: int = 4096, twonn_keep: float = 0.9, progress: bool = True) -> Profile:
    if sample_size < 3:
        raise LeanformerError(f"sample size must be at least 3 for TwoNN, got {sample_size}")
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise LeanformerError("no text to inspect: the input is empty")
    hidden = int(getattr(model.config, "hidden_size", 0) or getattr(model.config, "d_model", 0))
    find_blocks(model)  # fail before tokenizing when the architecture is not supported
    chunks = token_chunks(tokenizer, texts, max_length=max_length, tokens=tokens)
    n_tokens = sum(len(c) for c in chunks)
    if n_tokens <= hidden:
        raise LeanformerError(
            f"only {n_tokens} tokens of text, but linearity needs more tokens than the hidden size ({hidden}): "
            f"give at least {hidden + 1} tokens (≥{10 * hidden} for a stable estimate) via more --text or --tokens")
    started = time.perf_counter()
    if batch_size <= 0:
        raise LeanformerError(f"--batch-size must be positive, got {batch_size}")
    acc = GeometryAccumulator(sample_positions(n_tokens, sample_size, seed))
    offsets = np.cumsum([0] + [len(c) for c in chunks])
    order = sorted(range(len(chunks)), key=lambda i: len(chunks[i]))
    with tqdm(total=n_tokens, unit="tok", desc="inspect", disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            group = order[start:start + batch_size]
            states, last, near_zero = capture(model, pad_batch(tokenizer, [chunks[i] for i in group]),
                                              mlp_eps=MLP_SPARSITY_EPS)
            positions = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in group])
            acc.update(states, positions, last, near_zero)
            bar.update(len(positions))
    capture_seconds = time.perf_counter() - started
    layers = acc.layer_metrics(twonn_keep=twonn_keep)
    transitions = acc.transition_metrics()
    is_decoder = "causal-lm" in (head_kind(model), head_kind(model.config))
    info = {
        "n_sequences": acc.n_sequences, "max_length": max_length, "seed": seed,
        "intrinsic_dim_estimator": f"TwoNN, linear fit on the smallest {twonn_keep:.0%} of mu "
                                   f"({'scikit-dimension default' if twonn_keep == 0.9 else 'custom'}), "
                                   f"{min(sample_size, n_tokens)} sampled tokens",
        "hidden_states": "h_0 = block-0 input (embeddings), h_i = output of block i-1"
                         + ("; h_L is the residual stream before the final norm" if is_decoder else ""),
        "intrinsic_dim_undefined": "shown as null/— when fewer than 3 distinct points remain after TwoNN drops "
                                   "duplicated points (e.g. h_0 of a decoder without position embeddings)",
        "mlp_sparsity": f"fraction of MLP activations with |a| <= {MLP_SPARSITY_EPS} (layer i: block i-1's MLP)",
        "capture_and_accumulate_seconds": capture_seconds,
        "metrics_seconds": time.perf_counter() - started - capture_seconds,
    }
    return Profile(model_label(model), n_tokens, hidden, layers, transitions, info)

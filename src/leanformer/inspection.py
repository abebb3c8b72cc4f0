"""inspect(): per-layer geometry of any HF model on any text.

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
from .configs import check_positive, with_overrides
from .errors import LeanformerError
from .metrics import GeometryAccumulator, sample_positions
from .metrics.schema import LAYER_METRICS, MLP_SPARSITY_EPS, TRANSITION_METRICS
from .models import head_kind, model_label


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
        """One row per hidden state h_i with its layer metrics, then the metrics of block h_i → h_{i+1};
        columns as defined in metrics.schema."""
        def cells(metrics, row) -> str:
            return " ".join(f"{m.format(row[m.name]):>{len(m.short)}}" for m in metrics)

        head = (f"{'layer':>5} " + " ".join(m.short for m in LAYER_METRICS) + f" │ {'block':>6} "
                + " ".join(m.short for m in TRANSITION_METRICS))
        rows = [head, "─" * len(head)]
        for i, layer in enumerate(self.layers):
            line = f"{i:>5} " + cells(LAYER_METRICS, layer)
            if i < len(self.transitions):
                line += f" │ {f'{i}→{i + 1}':>6} " + cells(TRANSITION_METRICS, self.transitions[i])
            rows.append(line)
        return "\n".join(rows)


@dataclass
class InspectConfig:
    """How much text `inspect` reads, and how it samples it."""
    tokens: int = field(default=16384, metadata={"help": "number of tokens to profile"})
    max_seq_length: int = field(default=128, metadata={"help": "tokens per sequence window"})
    batch_size: int = field(default=64, metadata={"help": "sequences per forward pass"})
    seed: int = field(default=0, metadata={"help": "seed of the token sample for intrinsic dimension"})
    sample_size: int = field(default=4096, metadata={"help": "tokens sampled for intrinsic dimension (TwoNN)"})
    twonn_keep: float = field(default=0.9, metadata={
        "help": "TwoNN (Facco et al. 2017): fraction of the smallest distance ratios kept in the linear fit "
                "(0.9 = scikit-dimension's default)"})

    def __post_init__(self):
        check_positive(self, "tokens", "batch_size")
        if self.max_seq_length < 4:
            raise LeanformerError(f"max_seq_length must be at least 4, got {self.max_seq_length}")
        if self.sample_size < 3:
            raise LeanformerError(f"sample_size must be at least 3 for TwoNN, got {self.sample_size}")
        if not 0 < self.twonn_keep <= 1:
            raise LeanformerError(f"twonn_keep must be in (0, 1], got {self.twonn_keep}")


def inspect(model, tokenizer, texts: Sequence[str], config: InspectConfig | None = None, *, progress: bool = True,
            **overrides) -> Profile:
    """Per-layer geometry of `model` on `texts` (see Profile). `config` defaults to InspectConfig();
    keyword overrides change single fields: inspect(model, tok, texts, tokens=4096). The old keyword
    max_length is accepted for max_seq_length."""
    config = with_overrides(InspectConfig, config, overrides, renamed={"max_length": "max_seq_length"})
    tokens, max_length, batch_size = config.tokens, config.max_seq_length, config.batch_size
    seed, sample_size, twonn_keep = config.seed, config.sample_size, config.twonn_keep
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

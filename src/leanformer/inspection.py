"""inspect(): per-layer geometry of any HF model on any text.

Capture h_0…h_L batch by batch and feed a streaming accumulator, so memory is O(L·d²) whatever the
token count; intrinsic dimension uses a seeded sample of `sample_size` token positions. Windows are
batched by length (as HF's group_by_length) so little compute goes to padding, longest first (as
HF's LengthGroupedSampler): the first batch sizes every buffer, later ones reuse the freed memory,
so peak memory does not creep up with the token count. No metric depends on the order. Causal LMs also get the logit lens (metrics.logit_lens).
"""
from __future__ import annotations

import hashlib
import time

import numpy as np
import torch
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

from tqdm.auto import tqdm

from .architectures import find_blocks, use_blocks
from .capture import capture
from .compress.prune import PROFILE_KEYS, rank_runs
from .text import pad_batch, token_chunks
from .configs import check_positive, with_overrides
from .errors import LeanformerError
from .metrics import GeometryAccumulator, sample_positions
from .metrics.logit_lens import LogitLensAccumulator, next_token_targets
from .metrics.schema import LAYER_METRICS, MLP_SPARSITY_EPS, TRANSITION_METRICS, shown
from .metrics.twonn import ID_ESTIMATORS
from .models import head_kind, model_label
from .stack import applied

# Who uses which TwoNN fit (metrics.twonn.ID_ESTIMATORS), as the report states it.
ID_ESTIMATOR_USE = {
    "twonn-skdim": "fit on the smallest 90 % of μ (the largest 10 % discarded): Facco et al., Sci. Rep. 2017, "
                   "and scikit-dimension's TwoNN default (discard_fraction=0.1)",
    "twonn-paper": "fit on the smallest N//5 of μ: the estimator behind the per-layer intrinsic-dimension curves of "
                   "Razzhigaev et al., The Shape of Learning (EACL 2024 Findings) and Your Transformer is Secretly "
                   "Linear (ACL 2024)",
}
# Where a decoder keeps its final norm, next to its block list (Llama/Mistral/Gemma: norm; GPT-2,
# Falcon, BLOOM: ln_f; OPT, GPT-NeoX: final_layer_norm; Phi: final_layernorm).
FINAL_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "final_norm", "norm_f")


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
        columns as defined in metrics.schema (those without any value left out)."""
        layer_metrics, transition_metrics = shown(LAYER_METRICS, self.layers), shown(TRANSITION_METRICS, self.transitions)

        def cells(metrics, row) -> str:
            return " ".join(f"{m.format(row.get(m.name)):>{len(m.short)}}" for m in metrics)

        head = (f"{'layer':>5} " + " ".join(m.short for m in layer_metrics) + f" │ {'block':>6} "
                + " ".join(m.short for m in transition_metrics))
        rows = [head, "─" * len(head)]
        for i, layer in enumerate(self.layers):
            line = f"{i:>5} " + cells(layer_metrics, layer)
            if i < len(self.transitions):
                line += f" │ {f'{i}→{i + 1}':>6} " + cells(transition_metrics, self.transitions[i])
            rows.append(line)
        return "\n".join(rows)

    def pruning_candidates(self, top: int = 3) -> dict[str, list[dict]]:
        """For each criterion of `leanformer prune` (compress.prune), the single blocks it would remove
        first, most removable first, with the criterion's value: {criterion: [{"block", "value"}, …]}.
        The ranking is prune's own (rank_runs), so `prune --layers 1 --by C` on the same text removes
        the first block listed under C."""
        out = {}
        for by, key in PROFILE_KEYS.items():
            values = [t[key] for t in self.transitions]
            out[by] = [{"block": self.transitions[s]["from"], "value": values[s]} for s in rank_runs(values, by)[:top]]
        return out


@dataclass
class InspectConfig:
    """How much text `inspect` reads, how it samples it, and which estimators it uses."""
    tokens: int = field(default=16384, metadata={"help": "number of tokens to profile"})
    max_seq_length: int = field(default=128, metadata={"help": "tokens per sequence window"})
    batch_size: int = field(default=16, metadata={
        "help": "sequences per forward pass (16 × 128 tokens: as fast as 64 on CPU, and peak memory stays flat "
                "from 16k to 64k tokens; see benchmarks/inspect_bench.py)"})
    seed: int = field(default=0, metadata={"help": "seed of the token sample for intrinsic dimension"})
    sample_size: int = field(default=4096, metadata={"help": "tokens sampled for intrinsic dimension (TwoNN)"})
    id_estimator: str = field(default="twonn-skdim", metadata={
        "help": "intrinsic dimension: twonn-skdim = TwoNN fitted on the smallest 90 percent of distance ratios "
                "(Facco et al. 2017; scikit-dimension); twonn-paper = on the smallest N/5 (the curves of "
                "Razzhigaev et al. 2024)", "choices": tuple(ID_ESTIMATORS)})
    logit_lens: bool = field(default=True, metadata={
        "help": "causal LMs: decode every layer through the final norm and LM head (per-layer next-token loss, "
                "top-1 agreement with the last layer); encoders have none"})
    blocks: str | None = field(default=None, metadata={
        "help": "dotted path of the model's block list, e.g. model.decoder.layers (none = found from the "
                "architecture)"})

    def __post_init__(self):
        check_positive(self, "tokens", "batch_size")
        if self.max_seq_length < 4:
            raise LeanformerError(f"max_seq_length must be at least 4, got {self.max_seq_length}")
        if self.sample_size < 3:
            raise LeanformerError(f"sample_size must be at least 3 for TwoNN, got {self.sample_size}")
        if self.id_estimator not in ID_ESTIMATORS:
            raise LeanformerError(f"unknown id_estimator {self.id_estimator!r}; choose from {', '.join(ID_ESTIMATORS)}")


def inspect(model, tokenizer, texts: Sequence[str], config: InspectConfig | None = None, *, progress: bool = True,
            **overrides) -> Profile:
    """Per-layer geometry of `model` on `texts` (see Profile). `config` defaults to InspectConfig();
    keyword overrides change single fields: inspect(model, tok, texts, tokens=4096). The old keyword
    max_length is accepted for max_seq_length."""
    config = with_overrides(InspectConfig, config, overrides, renamed={"max_length": "max_seq_length"})
    tokens, max_length, batch_size = config.tokens, config.max_seq_length, config.batch_size
    seed, sample_size = config.seed, config.sample_size
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise LeanformerError("no text to inspect: the input is empty")
    hidden = int(getattr(model.config, "hidden_size", 0) or getattr(model.config, "d_model", 0))
    if config.blocks:
        use_blocks(model, config.blocks)
    find_blocks(model)  # fail before tokenizing when the architecture is not supported
    chunks = token_chunks(tokenizer, texts, max_length=max_length, tokens=tokens)
    n_tokens = sum(len(c) for c in chunks)
    if n_tokens <= hidden:
        raise LeanformerError(
            f"only {n_tokens} tokens of text, but linearity needs more tokens than the hidden size ({hidden}): "
            f"give at least {hidden + 1} tokens (≥{10 * hidden} for a stable estimate) via more --text or --tokens")
    decode, lens_note = _logit_lens(model) if config.logit_lens else (None, "turned off (logit_lens=False)")
    lens = None
    started = time.perf_counter()
    acc = GeometryAccumulator(sample_positions(n_tokens, sample_size, seed))
    offsets = np.cumsum([0] + [len(c) for c in chunks])
    order = sorted(range(len(chunks)), key=lambda i: -len(chunks[i]))
    with tqdm(total=n_tokens, unit="tok", desc="inspect", disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            group = order[start:start + batch_size]
            batch = pad_batch(tokenizer, [chunks[i] for i in group])
            states, last, near_zero = capture(model, batch, mlp_eps=MLP_SPARSITY_EPS)
            positions = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in group])
            acc.update(states, positions, last, near_zero)
            if decode is not None and lens is None:  # first batch: does decoding h_L give the model's logits?
                decode, lens_note = _check_decode(model, batch, states[-1], decode)
                lens = LogitLensAccumulator(decode) if decode is not None else None
            if lens is not None:
                lens.update(states, next_token_targets(batch["input_ids"], batch["attention_mask"]))
            bar.update(len(positions))
    capture_seconds = time.perf_counter() - started
    layers = acc.layer_metrics(twonn_keep=ID_ESTIMATORS[config.id_estimator])
    lens_rows = lens.metrics() if lens is not None else [{"logit_lens_loss": None, "logit_lens_agreement": None}] * len(layers)
    layers = [{**layer, **lens_row} for layer, lens_row in zip(layers, lens_rows)]
    transitions = acc.transition_metrics()
    is_decoder = "causal-lm" in (head_kind(model), head_kind(model.config))
    info = {
        "n_sequences": acc.n_sequences, "max_length": max_length, "seed": seed,
        "sample_size": min(sample_size, n_tokens),
        "id_estimator": config.id_estimator,
        "intrinsic_dim_estimator": f"{config.id_estimator}: TwoNN {ID_ESTIMATOR_USE[config.id_estimator]}; "
                                   f"{min(sample_size, n_tokens)} sampled tokens",
        "hidden_states": "h_0 = block-0 input (embeddings), h_i = output of block i-1"
                         + ("; h_L is the residual stream before the final norm" if is_decoder else ""),
        "intrinsic_dim_undefined": "shown as null/— when fewer than 3 distinct points remain after TwoNN drops "
                                   "duplicated points (e.g. h_0 of a decoder without position embeddings)",
        "mlp_sparsity": f"fraction of MLP activations with |a| <= {MLP_SPARSITY_EPS} (layer i: block i-1's MLP)",
        "logit_lens": (f"h_i decoded by the final norm and LM head; loss over {lens.n_targets} next-token targets "
                       "(a window's last token has none)" if lens is not None else f"skipped: {lens_note}"),
        "transforms": describe_transforms([e.to_json() for e in applied(model)]),
        "block_origin": block_origin([e.to_json() for e in applied(model)], len(transitions)),
        "text_sha256": hashlib.sha256("\x1e".join(texts).encode()).hexdigest(),
        "tokens_sha256": _tokens_digest(chunks),
        "capture_and_accumulate_seconds": capture_seconds,
        "metrics_seconds": time.perf_counter() - started - capture_seconds,
    }
    return Profile(model_label(model), n_tokens, hidden, layers, transitions, info)


def describe_transforms(entries: list[dict]) -> list[str]:
    """One line per applied transform (the entries of leanformer.json "transforms", in order)."""
    lines = []
    for e in entries:
        kind, config, state = e.get("transform"), e.get("config") or {}, e.get("state") or {}
        if kind == "prune":
            result = state.get("result", {})
            what = "replaced by a linear map" if config.get("replace") == "linear" else "removed"
            lines.append(f"prune: blocks {result.get('removed')} {what} (by {config.get('by')}), "
                         f"{result.get('n_layers_before')} → {result.get('n_layers_after')} blocks")
        elif kind == "quantize":
            lines.append(f"quantize: {config.get('method')} {config.get('bits')}-bit, "
                         f"{len(state.get('layers', {}))} linear layers")
        elif kind == "adapt":
            lines.append(f"adapt: {config.get('method')} rank {config.get('rank')} '{state.get('name')}' "
                         f"on {len(state.get('layers', []))} layers")
        else:
            lines.append(str(kind))
    return lines


def block_origin(entries: list[dict], n_blocks: int) -> list:
    """Each current block's index in the model before any pruning (a list of indices for a linear map
    standing in for a run of blocks), from the "prune" entries of a transform stack: how a pruned
    model's layers line up with its base's (compare)."""
    origin = None
    for e in entries:
        if e.get("transform") != "prune":
            continue
        result = e["state"]["result"]
        origin = origin if origin is not None else list(range(result["n_layers_before"]))
        start, n = result["start"], result["n"]
        replaced = [i for o in origin[start:start + n] for i in (o if isinstance(o, list) else [o])]
        origin = origin[:start] + ([replaced] if e["config"].get("replace") == "linear" else []) + origin[start + n:]
    return origin if origin is not None else list(range(n_blocks))


def _tokens_digest(chunks: list[list[int]]) -> str:
    """Digest of the token windows (ids and boundaries): equal digests mean the same tokens."""
    h = hashlib.sha256()
    for c in chunks:
        h.update(np.asarray([len(c), *c], dtype=np.int64).tobytes())
    return h.hexdigest()


def _logit_lens(model) -> tuple[Callable | None, str]:
    """The decoder h ↦ LM head(final norm(h)) of a causal LM, or None and why there is none."""
    if "causal-lm" not in (head_kind(model), head_kind(model.config)):
        return None, "not a causal LM (an encoder or a classifier has no next-token head to decode with)"
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        return None, f"{type(model).__name__} has no output embeddings (LM head)"
    _, path = find_blocks(model)
    parent = model.get_submodule(path.rsplit(".", 1)[0]) if "." in path else model
    norm = next((getattr(parent, n) for n in FINAL_NORM_NAMES if isinstance(getattr(parent, n, None), torch.nn.Module)),
                None)
    if norm is None:
        return None, f"no final norm next to the block list {path} (looked for {', '.join(FINAL_NORM_NAMES)})"
    project_out = getattr(parent, "project_out", None)  # OPT-350m: hidden size → embedding size

    def decode(h: torch.Tensor) -> torch.Tensor:
        h = norm(h.to(head.weight.dtype))
        return head(project_out(h) if project_out is not None else h)
    return decode, ""


@torch.no_grad()
def _check_decode(model, batch: dict, final_states: torch.Tensor, decode: Callable) -> tuple[Callable | None, str]:
    """Decoding h_L must give the model's own logits (else the model post-processes them, e.g. Gemma-2's
    soft-capping, and the lens would misread every layer): checked on the batch's first window."""
    n = int(batch["attention_mask"][0].sum())
    device = final_states.device
    logits = model(input_ids=batch["input_ids"][:1, :n].to(device),
                   attention_mask=batch["attention_mask"][:1, :n].to(device)).logits[0].float()
    ours = decode(final_states[:n]).float()
    gap = float((ours - logits).abs().max())
    if gap > 1e-3 * (1 + float(logits.abs().max())):
        return None, (f"decoding h_L with the final norm and LM head differs from the model's logits by {gap:.3g}: "
                      "the model transforms its logits further, so the lens would misread every layer")
    return decode, ""

"""Layer pruning and linear replacement guided by layer geometry (Razzhigaev et al.,
"Your Transformer is Secretly Linear", ACL 2024; Men et al., ShortGPT, 2024; Gromov et al. 2024;
Shopkhoev et al., ReplaceMe, 2025).

A run of n consecutive blocks ℓ…ℓ+n−1 is either dropped (h_{ℓ+n} := h_ℓ) or replaced by one affine
map h_{ℓ+n} ≈ h_ℓ A + b fitted by least squares on calibration hidden states (ReplaceMe's idea,
without its folding into a neighbour's weights, which only pre-norm decoders allow exactly).

Which run: each criterion scores every run from the same calibration pass over the unpruned model,
comparing the run's input h_ℓ with its output h_{ℓ+n}:
  linearity        higher = more removable; 1 − linearity is exactly the normalised residual of
                   the least-squares map, so it predicts what linear replacement loses
  block_influence  ShortGPT's 1 − mean cos(h_ℓ, h_{ℓ+n}); lower = more removable
  angular          Gromov et al.'s arccos(cos)/π on each sequence's last token; lower = more removable
  index            no scoring: the run starting at `start` (default: the n blocks before the last)

Saving (`lf.save`): a pruned model without fitted maps is an ordinary Hugging Face checkpoint of the
same architecture with n fewer layers; the maps, when present, are replayed by `lf.load`.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..architectures import find_blocks, use_blocks
from ..capture import iter_hidden_states
from ..configs import check_positive, with_overrides
from ..errors import LeanformerError
from ..metrics import angular_distance, block_influence, linearity
from ..stack import Applied, push, record_base
from ..text import default_corpus, token_chunks
from .surgery import set_blocks

CRITERIA = ("linearity", "block_influence", "angular", "index")
REPLACEMENTS = ("none", "linear")
# Sign that turns each criterion's score into predicted damage (higher = worse to remove).
DAMAGE_SIGN = {"linearity": -1.0, "block_influence": 1.0, "angular": 1.0}
# Each criterion's key in an inspect profile's "transitions" rows (its scores for runs of n = 1).
PROFILE_KEYS = {"linearity": "linearity", "block_influence": "block_influence", "angular": "angular_distance"}


def rank_runs(scores: Sequence[float], by: str) -> list[int]:
    """Run starts from most to least removable under criterion `by` (ties: the earlier run first);
    `prune_layers` removes the first, `inspect` reports them as pruning candidates."""
    return sorted(range(len(scores)), key=lambda s: DAMAGE_SIGN[by] * scores[s])


class LinearReplacement(nn.Module):
    """Stands in for a run of blocks inside the block list: h ↦ h A + b, same call shape as a block."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, replaces: Sequence[int] = (),
                 returns_tuple: bool = False, tuple_length: int = 1):
        super().__init__()
        self.weight = nn.Parameter(weight.float())  # (d, d), applied as h @ weight
        self.bias = nn.Parameter(bias.float())
        self.replaces = list(replaces)
        # some architectures' blocks return (hidden_states, …): DeBERTa-v2's callers unpack exactly two,
        # so the map returns a tuple of the blocks' length, the entries after the hidden states None
        self.returns_tuple = returns_tuple
        self.tuple_length = tuple_length
        self.attention_type = "full_attention"  # read by models that pick a mask per layer

    def forward(self, hidden_states, *args, **kwargs):
        out = hidden_states @ self.weight.to(hidden_states.dtype) + self.bias.to(hidden_states.dtype)
        return (out,) + (None,) * (self.tuple_length - 1) if self.returns_tuple else out

    def extra_repr(self) -> str:
        return f"d={self.weight.shape[0]}, replaces blocks {self.replaces}"


@dataclass
class Calibration:
    """Hidden states h_0…h_L of the unpruned model on calibration text (padding removed)."""
    states: list[torch.Tensor]  # each (n_tokens, d), float32
    last_token: torch.Tensor  # row of each sequence's last token
    returns_tuple: bool = False
    tuple_length: int = 1  # entries of a block's output tuple (when returns_tuple)

    @property
    def n_tokens(self) -> int:
        return self.states[0].shape[0]


@dataclass
class PruneResult:
    removed: list[int]  # original indices of the removed blocks
    start: int
    n: int
    by: str
    replace: str
    scores: dict[str, list[float]] = field(default_factory=dict)  # criterion → score of run starting at ℓ
    n_layers_before: int = 0
    n_layers_after: int = 0

    def to_json(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------------------------
# Calibration and scores


@torch.no_grad()
def calibrate(model: nn.Module, tokenizer, texts: Sequence[str], tokens: int = 8192, max_length: int = 256,
              batch_size: int = 8) -> Calibration:
    """Run the model over up to `tokens` calibration tokens and keep every layer's hidden states."""
    blocks, _ = find_blocks(model)
    d = model.config.hidden_size
    chunks = token_chunks(tokenizer, texts, max_length=max_length, tokens=tokens)
    n = sum(len(c) for c in chunks)
    need = 2 * (d + 1)
    if n < need:
        raise LeanformerError(
            f"calibration text gives {n} tokens; fitting and scoring a {d}-dimensional hidden state needs at "
            f"least {need} (2 × (hidden size + 1)) — pass a longer calibration text (--text) or raise tokens (--tokens)")
    outputs = []  # how block 0 returns: a tensor, or a tuple of this many entries
    probe = blocks[0].register_forward_hook(lambda _m, _a, out: outputs.append(len(out) if isinstance(out, tuple) else 0))
    states: list[list[torch.Tensor]] = [[] for _ in range(len(blocks) + 1)]
    lasts, offset = [], 0
    try:
        for hs, last, _ in tqdm(iter_hidden_states(model, tokenizer, chunks, batch_size),
                                total=-(-len(chunks) // batch_size), desc="calibrate", leave=False):
            for i, h in enumerate(hs):
                states[i].append(h.cpu())
            lasts.append(last.cpu() + offset)
            offset += hs[0].shape[0]
    finally:
        probe.remove()
    return Calibration([torch.cat(s) for s in states], torch.cat(lasts), bool(outputs and outputs[0]),
                       max(outputs[0], 1) if outputs else 1)


def score_runs(calib: Calibration, n: int) -> dict[str, list[float]]:
    """Each criterion's score for every run of n blocks, indexed by its first block ℓ."""
    L = len(calib.states) - 1
    scores: dict[str, list[float]] = {"linearity": [], "block_influence": [], "angular": []}
    for s in range(L - n + 1):
        X, Y = calib.states[s], calib.states[s + n]
        scores["linearity"].append(linearity(X, Y))
        scores["block_influence"].append(block_influence(X, Y))
        scores["angular"].append(angular_distance(X[calib.last_token], Y[calib.last_token]))
    return scores


def fit_linear_map(X: torch.Tensor, Y: torch.Tensor, ridge: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """Affine least squares Y ≈ X A + b in float64, with a small ridge pulling A toward the identity
    (the residual stream's own map) so near-null directions of X stay well-posed."""
    X, Y = X.double(), Y.double()
    mx, my = X.mean(0), Y.mean(0)
    Xc, Yc = X - mx, Y - my
    G = Xc.T @ Xc
    lam = ridge * G.diagonal().mean().clamp_min(1e-12)
    eye = torch.eye(G.shape[0], dtype=G.dtype)
    A = torch.linalg.solve(G + lam * eye, Xc.T @ Yc + lam * eye)
    return A.float(), (my - mx @ A).float()


# --------------------------------------------------------------------------------------------
# Pruning


@dataclass
class PruneConfig:
    """Which run of blocks `prune_layers` removes, what replaces it, and the calibration it scores on."""
    n: int = field(metadata={"help": "number of consecutive blocks to remove", "flag": "--layers", "metavar": "N"})
    by: str = field(default="linearity", metadata={
        "help": "how to pick the run: linearity, block_influence (ShortGPT), angular (Gromov et al.) or index",
        "choices": CRITERIA})
    replace: str = field(default="none", metadata={
        "help": "none = drop the blocks; linear = replace them by an affine map fitted on calibration states",
        "choices": REPLACEMENTS})
    start: int | None = field(default=None, metadata={
        "help": "with by=index: first block removed (none = the n blocks before the last)"})
    tokens: int = field(default=8192, metadata={"help": "calibration tokens"})
    max_seq_length: int = field(default=256, metadata={"help": "tokens per calibration sequence window"})
    batch_size: int = field(default=8, metadata={"help": "calibration sequences per forward pass"})
    ridge: float = field(default=1e-4, metadata={
        "help": "replace=linear: ridge of the least-squares fit, pulling the map toward the identity"})
    blocks: str | None = field(default=None, metadata={
        "help": "dotted path of the model's block list, e.g. model.decoder.layers (none = found from the "
                "architecture)"})

    def __post_init__(self):
        if self.by not in CRITERIA:
            raise LeanformerError(f"unknown criterion by={self.by!r}; choose from {', '.join(CRITERIA)}")
        if self.replace not in REPLACEMENTS:
            raise LeanformerError(f"unknown replacement {self.replace!r}; choose from {', '.join(REPLACEMENTS)}")
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise LeanformerError(f"n must be a positive number of blocks, got {self.n!r}")
        if self.start is not None and self.by != "index":
            raise LeanformerError(f"start is only for by='index' (by={self.by!r} chooses the run itself)")
        check_positive(self, "tokens", "batch_size")
        if self.max_seq_length < 4:
            raise LeanformerError(f"max_seq_length must be at least 4, got {self.max_seq_length}")
        if self.ridge < 0:
            raise LeanformerError(f"ridge must be ≥ 0, got {self.ridge}")


def _check(model: nn.Module, n: int) -> tuple[nn.ModuleList, int]:
    blocks, _ = find_blocks(model)
    L = len(blocks)
    if any(isinstance(b, LinearReplacement) for b in blocks):
        raise LeanformerError("this model is already pruned with linear replacements; prune the original model")
    if n >= L:
        raise LeanformerError(f"cannot remove {n} of {L} blocks: choose 1..{L - 1} (at least one block must stay)")
    return blocks, L


def prune_layers(model: nn.Module, config: PruneConfig | int, *, tokenizer=None, texts: Sequence[str] | None = None,
                 calibration: Calibration | None = None, **overrides) -> PruneResult:
    """Remove (or linearly replace) the run of n consecutive blocks the criterion finds most removable.

    In place. `config` is a PruneConfig, or the number of blocks n with the other fields as keywords
    (prune_layers(model, 2, by="index", start=3); max_length= is accepted for max_seq_length).
    Calibration hidden states come from `calibration`, else from `texts` (default: the built-in
    corpus) through `tokenizer`; by="index" with replace="none" needs neither."""
    renamed = {"max_length": "max_seq_length"}
    if isinstance(config, PruneConfig):
        config = with_overrides(PruneConfig, config, overrides, renamed)
    else:
        config = with_overrides(PruneConfig, None, {"n": config, **overrides}, renamed)
    n, by, replace, start = config.n, config.by, config.replace, config.start
    if config.blocks:
        use_blocks(model, config.blocks)
    blocks, L = _check(model, n)
    if by == "index":
        start = L - n - 1 if start is None else start
        if not 0 <= start <= L - n:
            raise LeanformerError(f"start={start} with n={n}: the run must lie in blocks 0..{L - 1}, so start in 0..{L - n}")
    if calibration is None and (by != "index" or replace == "linear"):
        if tokenizer is None:
            raise LeanformerError(f"by={by!r}, replace={replace!r} needs calibration text: pass tokenizer= (and texts=)")
        if texts is None:
            texts = default_corpus()
        calibration = calibrate(model, tokenizer, texts, config.tokens, config.max_seq_length, config.batch_size)
    scores = score_runs(calibration, n) if calibration is not None else {}
    if by != "index":
        s = scores[by]
        start = rank_runs(s, by)[0]
    removed = list(range(start, start + n))
    record_base(model)
    new_blocks = list(blocks[:start])
    if replace == "linear":
        A, b = fit_linear_map(calibration.states[start], calibration.states[start + n], config.ridge)
        device = next(model.parameters()).device
        new_blocks.append(LinearReplacement(A, b, removed, calibration.returns_tuple, calibration.tuple_length).to(device))
    new_blocks += list(blocks[start + n:])
    set_blocks(model, new_blocks, _is_map)
    result = PruneResult(removed, start, n, by, replace, scores, L, L - n)
    maps = [{"position": pos, "replaces": b.replaces, "returns_tuple": b.returns_tuple, "tuple_length": b.tuple_length}
            for pos, b in enumerate(new_blocks) if _is_map(b)]
    push(model, Applied("prune", asdict(config), {"result": result.to_json(), "maps": maps}))
    return result


def _is_map(block: nn.Module) -> bool:
    return isinstance(block, LinearReplacement)


def replay(model: nn.Module, config: dict, state: dict) -> None:
    """Redo a recorded pruning's surgery; the fitted maps start empty (the state dict load fills them)."""
    if config.get("blocks"):
        use_blocks(model, config["blocks"])
    blocks, _ = find_blocks(model)
    start, n = state["result"]["start"], state["result"]["n"]
    new_blocks = list(blocks[:start])
    d = model.config.hidden_size
    for e in state["maps"]:
        new_blocks.append(LinearReplacement(torch.empty(d, d), torch.empty(d), e["replaces"], e["returns_tuple"],
                                            e.get("tuple_length", 1)))
    new_blocks += list(blocks[start + n:])
    set_blocks(model, new_blocks, _is_map)
    push(model, Applied("prune", config, state))


def pruned_copy(model: nn.Module, n: int, start: int, replace: str, calibration: Calibration | None = None,
                ridge: float = 1e-4) -> nn.Module:
    """A pruned deep copy (the benchmark's way to try every run without reloading)."""
    m = copy.deepcopy(model)
    prune_layers(m, n, by="index", replace=replace, start=start, calibration=calibration, ridge=ridge)
    return m

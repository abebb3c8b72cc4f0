"""Early exit for sequence classifiers: Zero Time Waste (Wołczyk et al., "Zero Time Waste: Recycling
Predictions in Early Exit Neural Networks", NeurIPS 2021) and plain (independent) internal classifiers.

`lf.early_exit(model, lf.EarlyExit(kind="ztw", tau=0.9))` puts an internal classifier (IC) on the
pooled state after every block but the last; the model's own head stays the last exit. Then
`model(**batch).logits` in eval mode stops, per example, at the first exit whose max probability
exceeds τ: after each block the rows that exited are dropped from the batch (with their attention
mask and every other batch-major block input), so the blocks after an exit never see them, and the
forward pass ends when no row is left. The block each example exited after is recorded
(`last_exits`), and the counters behind `leanformer.dynamic.cost` add up what was executed.

kind="ztw" (the authors' ztw_nlp/architectures/early_exits/ztw.py and heads.py):
  cascade    IC k reads [pool(h_k); LayerNorm(detached logits of IC k−1)] (h_k: block k's output)
             through one Linear layer (TransformerCascadingHead; the first IC reads pool(h_1) only)
  ensemble   exit k's prediction is softmax(q_k), q_k = mean_{j≤k} exp(w_kj)·log p_j + b_k, with its
             own weights w_k (init N(0, 0.01)) and bias b_k (init 0) (GeometricWeightedEnsemble:
             the mean, not the sum, and a per-class bias); no ensemble over the model's own head
kind="plain": independent Linear ICs on pool(h_k), each exiting on its own softmax (SDN-style).

pool: the mean over each example's unpadded tokens (default), or the first token as in the paper's BERT
heads (pooling="cls"). The first token says little before the last blocks of an encoder not trained to
summarise there: on minilm (all-MiniLM-L6-v2, trained with mean pooling) fine-tuned on SST-2, logistic
probes on 1 000 training sentences, scored on 1 000 other training sentences, read blocks 1–3 at the
majority rate from the first token and at 0.80–0.83 from the token mean.

Exit rule: max probability > τ, strictly, as the authors' ztw_nlp/eval.py: τ = 0 exits every
example at the first IC, τ = 1 never exits early (no probability exceeds 1), and then the ICs are
not even run, so predictions and cost are exactly the dense model's.

Training (train/finetuning.py, `finetune(..., early_exit=EarlyExit(...))`, `leanformer finetune
--early-exit ztw`) goes through transformers.Trainer: phase 1 trains the ICs on the mean of their
cross-entropies (backbone frozen and in eval mode, as the authors' `train('without_backbone')`; or
jointly with the backbone when a method is given, the model's head's loss included), phase 2 (ztw)
trains only the ensembles, at ENSEMBLE_LEARNING_RATE. In training mode the ICs run inside the
model's forward (block hooks) and the forward returns their loss as the model's loss, so DDP / FSDP
and any Trainer see the heads as the model's own parameters.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from ..architectures import find_blocks, model_type
from ..errors import LeanformerError
from ..models import classifier_head_name, head_kind
from ..stack import Applied, applied, push
from ..targets import linear_layers
from . import DynamicKind, check_tau, register
from .flops import dense_flops_per_token, linear_flops

KINDS = ("ztw", "plain")
POOLINGS = ("mean", "cls")
TRANSFORM = "early_exit"
MODULE_NAME = "early_exit"  # the heads' child module on the model: state-dict keys "early_exit.ics.0.fc.weight", …
# The authors' learning rates (ztw_nlp/scripts/reproduce_main_experiments.sh: heads 1e-3, ensembles 1e-4).
HEADS_LEARNING_RATE = 1e-3
ENSEMBLE_LEARNING_RATE = 1e-4
# Encoders whose classifier reads the first ([CLS]) token and whose blocks take batch-major inputs only.
ENCODER_TYPES = ("bert", "roberta", "electra", "distilbert", "xlm-roberta", "camembert")


@dataclass
class EarlyExit:
    """Internal classifiers after each block of a sequence classifier and the threshold they exit at."""
    kind: str = field(default="ztw", metadata={
        "help": "ztw: cascaded ICs + geometric ensemble (Zero Time Waste); plain: independent ICs", "choices": KINDS})
    tau: float = field(default=0.9, metadata={
        "help": "exit at the first IC whose max probability exceeds τ, in [0, 1] (1: never exit early)"})
    ensemble_learning_rate: float = field(default=ENSEMBLE_LEARNING_RATE, metadata={
        "help": "ztw: learning rate of the ensemble phase (the ICs' is the run's --learning-rate)"})
    pooling: str = field(default="mean", metadata={
        "help": "what each IC reads of its block's output: mean (over the unpadded tokens) or cls (the first "
                "token, as the ZTW paper's BERT heads)", "choices": POOLINGS})

    def __post_init__(self):
        if self.kind not in KINDS:
            raise LeanformerError(f"unknown early-exit kind {self.kind!r}; choose from {', '.join(KINDS)}")
        self.tau = check_tau(self.tau)
        if self.pooling not in POOLINGS:
            raise LeanformerError(f"unknown early-exit pooling {self.pooling!r}; choose from {', '.join(POOLINGS)}")
        if not self.ensemble_learning_rate > 0:
            raise LeanformerError(f"ensemble_learning_rate must be positive, got {self.ensemble_learning_rate!r}")

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# The heads


class InternalClassifier(nn.Module):
    """A Linear layer on the pooled state; with `cascade`, also on LayerNorm of the previous IC's
    logits, detached so that IC k's loss trains nothing of IC k−1 (heads.py, TransformerCascadingHead)."""

    def __init__(self, hidden: int, n_classes: int, cascade: bool):
        super().__init__()
        self.norm = nn.LayerNorm(n_classes) if cascade else None
        self.fc = nn.Linear(hidden + (n_classes if cascade else 0), n_classes)

    def forward(self, first_token: torch.Tensor, previous_logits: torch.Tensor | None = None) -> torch.Tensor:
        x = first_token
        if self.norm is not None:
            x = torch.cat([x, self.norm(previous_logits.detach())], dim=-1)
        return self.fc(x)


class GeometricEnsemble(nn.Module):
    """q = mean_j exp(w_j)·log p_j + b over the log-probabilities of ICs 0…k (ztw.py, GeometricWeightedEnsemble);
    softmax(q) is a normalised weighted geometric mean of the ICs' distributions."""

    def __init__(self, n_heads: int, n_classes: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_heads) * 0.01)
        self.bias = nn.Parameter(torch.zeros(n_classes))

    def forward(self, log_probs: torch.Tensor) -> torch.Tensor:  # (batch, n_heads, n_classes) → (batch, n_classes)
        return (log_probs * self.weight.exp()[:, None]).mean(dim=1) + self.bias


class _AllExited(Exception):
    """Raised inside the forward pass when no row is left: the blocks after it are not run."""


@dataclass
class _Pass:
    """One forward pass's bookkeeping. collect: every exit's logits are kept (training, all_exits);
    else rows exit and are dropped: `active` indexes the rows still running into the full batch."""
    collect: bool
    batch: int = 0
    mask: torch.Tensor | None = None  # (batch, seq) attention mask of the whole batch, for mean pooling
    active: torch.Tensor | None = None
    run_ics: bool = True
    previous: torch.Tensor | None = None  # the last IC's logits (active rows)
    log_probs: list = field(default_factory=list)  # ztw: the ICs' log-probabilities so far (active rows)
    ic_logits: list = field(default_factory=list)  # collect: per IC, (batch, C)
    exit_logits: list = field(default_factory=list)  # collect: per IC, what it exits with (ztw: the ensemble)
    out_logits: torch.Tensor | None = None  # inference: (batch, C), filled at each row's exit
    exit_block: torch.Tensor | None = None  # inference: blocks executed by each row (1…L)


class ExitHeads(nn.Module):
    """The ICs (and ztw's ensembles) of one model, its exit threshold, and the cost counters."""

    def __init__(self, kind: str, n_blocks: int, hidden: int, n_classes: int, tau: float, pooling: str = "mean"):
        super().__init__()
        self.kind, self.n_blocks, self.n_classes, self.tau, self.pooling = kind, n_blocks, n_classes, tau, pooling
        self.ics = nn.ModuleList(InternalClassifier(hidden, n_classes, cascade=kind == "ztw" and k > 0)
                                 for k in range(n_blocks - 1))
        self.ensembles = nn.ModuleList(GeometricEnsemble(k + 1, n_classes) for k in range(n_blocks - 1)) \
            if kind == "ztw" else nn.ModuleList()
        self.training_exits = False  # set by prepare_training: training forwards return the exits' loss
        self.phase = "heads"  # training: "heads" (the ICs' losses) or "ensemble" (the ensembles' losses)
        self.train_backbone = False  # training: False keeps the backbone in eval mode (no dropout)
        self.collect_all = False  # eval mode: keep every exit's logits instead of exiting (all_exits)
        self._pass: _Pass | None = None
        self.collected: _Pass | None = None  # the last collecting pass (training_loss reads it)
        self.last_exits: torch.Tensor | None = None  # blocks executed by each row of the last eval forward
        self.flops: _FlopModel | None = None
        self.reset_cost()

    def extra_repr(self) -> str:
        return f"kind={self.kind}, tau={self.tau}, exits after blocks 1…{self.n_blocks - 1} and the model's head"

    def reset_cost(self) -> None:
        self.counts = {"examples": 0, "tokens": 0, "exit_counts": [0] * self.n_blocks, "flops": 0.0,
                       "mlp_flops": 0.0, "dense_flops": 0.0, "dense_mlp_flops": 0.0, "blocks": 0}

    # -- inside the forward pass (block hooks) --------------------------------------------------

    def before_block(self, _module, args, kwargs):
        """Block k ≥ 1: cut its batch-major inputs (attention mask, position ids, …) to the rows still
        running; the hidden states arrive already cut by the previous block's hook."""
        p = self._pass
        if p is None or p.collect or p.active is None or len(p.active) == p.batch:
            return None

        def cut(v):
            return v[p.active] if isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[0] == p.batch else v
        hidden_in_kwargs = not args
        new_args = args[:1] + tuple(cut(a) for a in args[1:])
        new_kwargs = {k: (v if hidden_in_kwargs and k == "hidden_states" else cut(v)) for k, v in kwargs.items()}
        return new_args, new_kwargs

    def after_block(self, index: int, _module, _args, output):
        """Block `index`: run its IC on the pooled state; in eval mode let the confident rows exit."""
        p = self._pass
        if p is None or not p.run_ics or index >= len(self.ics):
            return None
        hidden = output if isinstance(output, torch.Tensor) else output[0]
        logits = self.ics[index](self._pooled(hidden, p), p.previous if self.ics[index].norm is not None else None)
        p.previous = logits
        exit_logits = logits
        if self.kind == "ztw" and (not p.collect or not self.training or self.phase == "ensemble"):
            p.log_probs.append(F.log_softmax(logits.float(), dim=-1))
            exit_logits = self.ensembles[index](torch.stack(p.log_probs, dim=1))
        if p.collect:
            p.ic_logits.append(logits)
            p.exit_logits.append(exit_logits)
            return None
        leaving = F.softmax(exit_logits.float(), dim=-1).amax(dim=-1) > self.tau
        if not bool(leaving.any()):
            return None
        rows = p.active[leaving]
        p.out_logits[rows] = exit_logits[leaving].to(p.out_logits.dtype)
        p.exit_block[rows] = index + 1
        staying = ~leaving
        if not bool(staying.any()):
            raise _AllExited
        p.active = p.active[staying]
        p.previous = p.previous[staying]
        p.log_probs = [lp[staying] for lp in p.log_probs]
        if isinstance(output, torch.Tensor):
            return output[staying]
        return tuple(o[staying] if isinstance(o, torch.Tensor) and o.shape[:1] == staying.shape else o for o in output)

    def _pooled(self, hidden: torch.Tensor, p: "_Pass") -> torch.Tensor:
        """What an IC reads: the first token's state, or the mean over each row's unpadded tokens."""
        if self.pooling == "cls":
            return hidden[:, 0]
        if p.mask is None:
            return hidden.mean(dim=1)
        mask = (p.mask if p.collect or p.active is None else p.mask[p.active]).to(hidden.dtype).unsqueeze(-1)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1)

    # -- the model's forward ------------------------------------------------------------------------

    def forward_model(self, model: nn.Module, original, kwargs: dict):
        if self.training and not self.training_exits:  # trained as a plain classifier: the exits take no part
            return original(**kwargs)
        if self.training or self.collect_all:
            return self._forward_collect(model, original, kwargs)
        if kwargs.get("output_hidden_states") or kwargs.get("output_attentions"):  # every layer's, so every layer runs
            return self._forward_exiting(model, original, kwargs, run_ics=False)
        return self._forward_exiting(model, original, kwargs, run_ics=self.tau < 1.0)

    def _forward_collect(self, model, original, kwargs):
        self._pass = _Pass(collect=True, mask=kwargs.get("attention_mask"))
        frozen = self.training and not self.train_backbone and model.training
        if frozen:  # the authors' train('without_backbone'): the frozen backbone runs without dropout
            model.eval()
            self.train()
        try:
            out = original(**kwargs)
        finally:
            if frozen:
                model.train()
            self.collected, self._pass = self._pass, None
        if self.training and kwargs.get("labels") is not None:
            # the exits' loss is the model's loss, so that DDP (which looks for the parameters the output
            # depends on) and every Trainer see the heads as part of the model
            out.loss = self.training_loss(kwargs["labels"], out.loss)
        return out

    def training_loss(self, labels: torch.Tensor, model_loss: torch.Tensor | None) -> torch.Tensor:
        """Mean cross-entropy of the ICs (phase "heads"; with the model's own head's loss when the backbone
        trains too, as the authors' methods/early_exit.py) or of the ensembles (phase "ensemble")."""
        p = self.collected
        labels = labels.view(-1)
        outputs = p.exit_logits if self.phase == "ensemble" else p.ic_logits
        terms = [F.cross_entropy(o.float(), labels) for o in outputs]
        if self.phase == "heads" and self.train_backbone and model_loss is not None:
            terms.append(model_loss)
        self.collected = None  # not kept past the step: deepcopy refuses graph tensors
        return torch.stack(terms).mean()

    def _forward_exiting(self, model, original, kwargs, run_ics: bool):
        from transformers.modeling_outputs import SequenceClassifierOutput

        labels = kwargs.pop("labels", None)
        rows_of = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
        if rows_of is None:
            raise LeanformerError("an early-exit model needs input_ids or inputs_embeds")
        batch, seq = rows_of.shape[0], rows_of.shape[1]
        device = rows_of.device
        p = _Pass(collect=False, batch=batch, mask=kwargs.get("attention_mask"),
                  active=torch.arange(batch, device=device), run_ics=run_ics,
                  out_logits=torch.empty(batch, self.n_classes, device=device, dtype=self.ics[0].fc.weight.dtype),
                  exit_block=torch.full((batch,), self.n_blocks, dtype=torch.long, device=device))
        self._pass = p
        try:
            final = original(**kwargs).logits
        except _AllExited:
            final = None
        finally:
            self._pass = None
        if final is not None:
            p.out_logits[p.active] = final.to(p.out_logits.dtype)
        mask = kwargs.get("attention_mask")
        lengths = mask.sum(dim=1) if mask is not None else torch.full((batch,), seq, device=device)
        self.last_exits = p.exit_block.cpu()
        self._count(model, self.last_exits, lengths.cpu(), run_ics)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(p.out_logits.float(), labels.to(device).view(-1))
        return SequenceClassifierOutput(loss=loss, logits=p.out_logits)

    # -- cost ---------------------------------------------------------------------------------------

    def _count(self, model, exits: torch.Tensor, lengths: torch.Tensor, ran_ics: bool) -> None:
        if self.flops is None:
            self.flops = _FlopModel(model, self)
        c = self.counts
        for blocks, n in zip(exits.tolist(), lengths.tolist()):
            n = int(n)
            flops, mlp = self.flops.executed(blocks, n, ics=min(blocks, len(self.ics)) if ran_ics else 0)
            dense, dense_mlp = self.flops.executed(self.n_blocks, n, ics=0)
            c["examples"] += 1
            c["tokens"] += n
            c["blocks"] += blocks
            c["exit_counts"][blocks - 1] += 1
            c["flops"] += flops
            c["mlp_flops"] += mlp
            c["dense_flops"] += dense
            c["dense_mlp_flops"] += dense_mlp

    def cost(self) -> dict:
        """Since the last reset: FLOPs executed (ICs included) over the dense model's on the same examples
        (flops_per_token; mlp_flops_per_token for the MLPs alone), layers_executed (mean fraction of the
        blocks run), exit_counts[b] (examples that ran b + 1 blocks; the last entry: the model's own head)."""
        c = self.counts
        ratio = (lambda a, b: a / b if b else None)
        return {"mlp_flops_per_token": ratio(c["mlp_flops"], c["dense_mlp_flops"]),
                "flops_per_token": ratio(c["flops"], c["dense_flops"]),
                "tokens": c["tokens"], "examples": c["examples"],
                "layers_executed": ratio(c["blocks"], c["examples"] * self.n_blocks),
                "exit_counts": list(c["exit_counts"]), "tau": self.tau, "kind": self.kind}


class _FlopModel:
    """Per-example FLOPs: each block costs a + b·n per token at n tokens (its projections plus its
    attention scores, leanformer.dynamic.flops); an IC run costs its Linear layer (and ztw's ensemble)
    once per sequence. The dense reference runs every block and no IC."""

    def __init__(self, model: nn.Module, heads: ExitHeads):
        from itertools import accumulate

        one, two = dense_flops_per_token(model, 1), dense_flops_per_token(model, 2)
        a = [2 * r1["attention"] - r2["attention"] for r1, r2 in zip(one["blocks"], two["blocks"])]
        b = [r2["attention"] - r1["attention"] for r1, r2 in zip(one["blocks"], two["blocks"])]
        ic = [sum(linear_flops(m) for m in linear_layers(ic).values())
              + (2 * (k + 1) * heads.n_classes if heads.kind == "ztw" else 0) for k, ic in enumerate(heads.ics)]
        # prefix sums (index k: the first k blocks / ICs), so that counting an example is O(1) in the forward
        self.attention_a, self.attention_b, self.mlp, self.ic = (
            [0, *accumulate(xs)] for xs in (a, b, [r["mlp"] for r in one["blocks"]], ic))

    def executed(self, blocks: int, n: int, ics: int) -> tuple[float, float]:
        """(all FLOPs, MLP FLOPs) of one n-token example that ran `blocks` blocks and `ics` ICs."""
        mlp = n * self.mlp[blocks]
        attention = n * (self.attention_a[blocks] + n * self.attention_b[blocks])
        return attention + mlp + self.ic[ics], mlp


class _ExitingForward:
    """Stands in for `model.forward` on an early-exit model: keeps the model's signature (Trainer keeps
    the batch columns it names) and routes the call through its ExitHeads."""

    def __init__(self, heads: ExitHeads, model: nn.Module):
        self.heads = heads
        self.model = model  # plain attribute (not a submodule); deepcopy maps it to the copy

    @property
    def __signature__(self):
        return inspect.signature(type(self.model).forward.__get__(self.model))

    def __call__(self, *args, **kwargs):
        original = type(self.model).forward.__get__(self.model)
        if args:  # as keywords: the hooks read input_ids / attention_mask by name
            names = list(inspect.signature(original).parameters)
            kwargs = {**dict(zip(names, args)), **kwargs}
        return self.heads.forward_model(self.model, original, kwargs)


# ---------------------------------------------------------------------------------------------
# The verb


def exit_heads(model: nn.Module) -> ExitHeads | None:
    """The model's ExitHeads (or None): on the model itself or on the model a peft wrapper holds."""
    found = getattr(model, MODULE_NAME, None)
    if isinstance(found, ExitHeads):
        return found
    return next((m for m in model.modules() if isinstance(m, ExitHeads)), None)


def _require_heads(model: nn.Module) -> ExitHeads:
    heads = exit_heads(model)
    if heads is None:
        raise LeanformerError(f"{type(model).__name__} has no early exits; add them with "
                              "lf.early_exit(model, lf.EarlyExit(...)) or `leanformer finetune --early-exit ztw`")
    return heads


def _check_model(model: nn.Module) -> tuple[nn.ModuleList, int, int]:
    """The block list, hidden size and class count of a supported classifier, or a clear error."""
    kind = model_type(model)
    if head_kind(model) != "sequence-classification" or classifier_head_name(model) is None:
        raise LeanformerError(
            f"early exit needs a sequence classifier: {type(model).__name__} has no classification head (looked for a "
            "*ForSequenceClassification model with a 'classifier' or 'score' head); load it with "
            "head='sequence-classification' (the finetune command does)")
    if kind not in ENCODER_TYPES:
        raise LeanformerError(
            f"early exit reads the first ([CLS]) token of an encoder; model type {kind!r} is not one of the supported "
            f"encoders {', '.join(ENCODER_TYPES)}")
    blocks, _ = find_blocks(model)
    if len(blocks) < 2:
        raise LeanformerError(f"{type(model).__name__} has {len(blocks)} block: early exit needs at least 2")
    n_classes = int(getattr(model.config, "num_labels", 0) or 0)
    if n_classes < 2:
        raise LeanformerError(f"early exit needs a classification task (≥ 2 labels) to read a confidence from; "
                              f"{type(model).__name__} has {n_classes} output(s) (regression)")
    return blocks, int(model.config.hidden_size), n_classes


def _install(model: nn.Module, config: EarlyExit) -> ExitHeads:
    blocks, hidden, n_classes = _check_model(model)
    like = next(model.parameters())
    heads = ExitHeads(config.kind, len(blocks), hidden, n_classes, config.tau, config.pooling).to(like.device,
                                                                                                  like.dtype)
    model.add_module(MODULE_NAME, heads)
    for i, block in enumerate(blocks):
        if i:
            block.register_forward_pre_hook(heads.before_block, with_kwargs=True)
        # bound methods and partials (not lambdas), so that copy.deepcopy(model) hooks the copy's heads
        block.register_forward_hook(functools.partial(heads.after_block, i))
    model.forward = _ExitingForward(heads, model)
    heads.train(model.training)
    return heads


def early_exit(model: nn.Module, config: EarlyExit | None = None, **overrides) -> ExitHeads:
    """Attach untrained internal classifiers after every block but the last of `model` (a BERT-style
    sequence classifier), in place; train them with `finetune(..., early_exit=config)`. Returns the
    heads module (also `model.early_exit`). Keywords override EarlyExit fields."""
    from ..configs import with_overrides

    config = with_overrides(EarlyExit, config, overrides)
    if exit_heads(model) is not None:
        raise LeanformerError(f"{type(model).__name__} already has early exits; set τ with "
                              "leanformer.dynamic.set_tau, or start from the model without them")
    _, hidden, n_classes = _check_model(model)
    blocks, _ = find_blocks(model)
    state = {"blocks": len(blocks), "hidden_size": hidden, "num_labels": n_classes}
    push(model, Applied(TRANSFORM, config.to_dict(), state))  # records the base before the heads exist
    return _install(model, config)


def replay(model: nn.Module, config: dict, state: dict) -> None:
    """Rebuild the heads of a saved early-exit model (their weights come with the state-dict load)."""
    config_obj = EarlyExit(**{"pooling": "cls", **config})  # saved before pooling existed: the first token
    blocks, hidden, n_classes = _check_model(model)
    got = {"blocks": len(blocks), "hidden_size": hidden, "num_labels": n_classes}
    if got != state:
        raise LeanformerError(
            f"these early exits were trained on a base with {state['blocks']} blocks, hidden size "
            f"{state['hidden_size']} and {state['num_labels']} labels, but the model they are loaded onto has "
            f"{got['blocks']}, {got['hidden_size']} and {got['num_labels']}: load them onto the base they were "
            "trained on")
    push(model, Applied(TRANSFORM, config_obj.to_dict(), dict(state)))
    _install(model, config_obj)


# ---------------------------------------------------------------------------------------------
# Training (called by train/finetuning.py)


def prepare_training(model: nn.Module, config: EarlyExit, train_backbone: bool) -> ExitHeads:
    """Attach the heads (unless the model has them) and make the ICs the trainable parameters; with
    train_backbone, whatever else requires grad (the backbone, an adapter) trains with them."""
    heads = exit_heads(model)
    if heads is None:
        heads = early_exit(model, config)
    elif heads.kind != config.kind:
        raise LeanformerError(f"the model already has {heads.kind!r} early exits; asked to train {config.kind!r}")
    return _enter_phase(model, heads, "heads", train_backbone)


def start_ensemble_phase(model: nn.Module) -> ExitHeads:
    """ztw phase 2: only the ensembles train; the ICs and the backbone are frozen (backbone in eval mode)."""
    return _enter_phase(model, _require_heads(model), "ensemble", train_backbone=False)


def _enter_phase(model: nn.Module, heads: ExitHeads, phase: str, train_backbone: bool) -> ExitHeads:
    """Make the phase's own parameters trainable ("heads": the ICs, "ensemble": the ensembles) and
    freeze the other exit parameters; without train_backbone every other parameter is frozen too."""
    if not train_backbone:
        for p in model.parameters():
            p.requires_grad_(False)
    for p in heads.ics.parameters():
        p.requires_grad_(phase == "heads")
    for p in heads.ensembles.parameters():
        p.requires_grad_(phase == "ensemble")
    heads.phase, heads.train_backbone, heads.training_exits = phase, train_backbone, True
    return heads


def end_training(model: nn.Module) -> None:
    heads = _require_heads(model)
    heads.phase, heads.train_backbone, heads.training_exits, heads.collected = "heads", False, False, None


# ---------------------------------------------------------------------------------------------
# Inspection


@contextlib.contextmanager
def all_exits(model: nn.Module):
    """Within the block, eval-mode forwards run every block and keep each exit's logits: read them with
    `exit_logits(model)` after the forward (the ICs' (ztw: the ensembles') logits, then the model's)."""
    heads = _require_heads(model)
    heads.collect_all = True
    try:
        yield heads
    finally:
        heads.collect_all = False


def exit_logits(model: nn.Module, final_logits: torch.Tensor) -> list[torch.Tensor]:
    """Each exit's logits from the last forward under `all_exits` (final_logits: that forward's .logits)."""
    heads = _require_heads(model)
    if heads.collected is None:
        raise LeanformerError("no collected forward: run the model inside `with all_exits(model):` first")
    collected, heads.collected = heads.collected, None  # read once (and not kept: deepcopy refuses graph tensors)
    return [*collected.exit_logits, final_logits]


def last_exits(model: nn.Module) -> torch.Tensor | None:
    """Blocks executed by each example of the last eval-mode forward (1…L; L: the model's own head)."""
    return _require_heads(model).last_exits


# ---------------------------------------------------------------------------------------------
# The dynamic-inference contract (leanformer.dynamic)


def _set_tau(model: nn.Module, tau: float) -> None:
    heads = _require_heads(model)
    heads.tau = tau
    entry = next((e for e in applied(model) if e.transform == TRANSFORM), None)
    if entry is not None:  # so that lf.save records the threshold in use
        entry.config = {**(entry.config if isinstance(entry.config, dict) else entry.config.to_dict()), "tau": tau}


register(DynamicKind(TRANSFORM, "exit threshold: an example leaves at the first internal classifier whose max "
                                "probability exceeds τ (1: never early)",
                     _set_tau, lambda m: _require_heads(m).reset_cost(), lambda m: _require_heads(m).cost()))



@torch.no_grad()
def exit_accuracies(model: nn.Module, tokenizer, text_a, text_b, labels, batch_size: int = 64,
                    max_length: int = 128) -> list[float]:
    """Accuracy of every exit on its own (the ICs', ztw: the ensembles', then the model's head), from
    one pass that runs every block."""
    device = next(model.parameters()).device
    correct: list[int] = []
    for i in range(0, len(text_a), batch_size):
        enc = tokenizer(list(text_a[i:i + batch_size]), None if text_b is None else list(text_b[i:i + batch_size]),
                        truncation=True, max_length=max_length, padding=True, return_tensors="pt").to(device)
        with all_exits(model):
            final = model(**enc).logits
            outs = exit_logits(model, final)
        y = torch.as_tensor(labels[i:i + batch_size], device=device)
        hits = [int((o.argmax(-1) == y).sum()) for o in outs]
        correct = hits if not correct else [a + b for a, b in zip(correct, hits)]
    return [c / max(len(text_a), 1) for c in correct]

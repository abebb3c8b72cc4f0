"""`plan(model, target_bits, calibration=…)`: per-layer quantization (method and bits) chosen from
measured sensitivity to meet an average honest bits/weight budget; `quantize(model, plan)` applies it.

For every target Linear layer i and candidate config c the plan measures
- honest bits b_i(c): 8 × the bytes of every tensor c stores for that layer (packed codes, codebooks,
  scales, zeros, step sizes, seeds: the accounting of compress/size.py), over the layer's weights;
  a candidate that cannot store the layer (Kashin NotConverged, a group size that does not divide
  the width) is not eligible there;
- its error e_i(c), with Ŵ = dequantize(quantize_weight(W)) — exactly what would be stored; a calibrated
  candidate (GPTQ) rounds with the Gram matrix XᵀX of the layer's calibration inputs below (applied, a
  sequential GPTQ rounds again after the other chosen layers, on the inputs they then give: QuantPlan.apply)
  — one of
  sensitivity="output" (the default): the relative squared change of the model's final hidden states
  on the calibration tokens, ‖H(Ŵ_i) − H‖² / ‖H‖² (padding excluded), with Ŵ put into layer i alone
  and every other layer left in full precision: one whole forward per layer and candidate (on
  MiniLM with 414 calibration tokens a forward is a few milliseconds, small beside quantizing the
  candidates, so no block-wise replay is needed). Summing these over layers assumes the layers'
  perturbations add up independently, as the per-layer sensitivities of ZeroQ's Pareto-frontier
  mixed-precision search do (Cai et al., "ZeroQ", CVPR 2020). It charges a layer for what reaches
  the model's output, where the layer's own output error does not: an error that the following
  normalisation, attention softmax or later blocks damp counts only as much as it moves the output.
  sensitivity="layer": the layer's relative output error ‖X Wᵀ − X Ŵᵀ‖² / ‖X Wᵀ‖² on its calibration
  inputs X. Only the Gram matrix XᵀX is kept (‖X Dᵀ‖² = tr(D XᵀX Dᵀ)), so memory does not grow with
  the calibration tokens. It is always measured (table key "output_error"; the end-to-end one is
  "final_error"), so `QuantPlan.with_target` can switch to it without quantizing again;
- importance s_b of the layer's block b (use_profile, off by default): its block influence
  BI_b = 1 − mean_t cos(h_b[t], h_{b+1}[t]) (Men et al., ShortGPT 2024, §3.1, eq. 1) — the inspect
  profile's `block_influence` — divided by its mean over blocks. Why: a relative error ε in a layer
  perturbs the block's update r = h_{b+1} − h_b by roughly ε‖r‖, and how much that moves the residual
  stream depends on ‖r‖ against ‖h‖; for small angles 1 − cos ≈ ½‖r_⊥‖²/‖h‖², the same squared-ratio
  scale as e_i, so s_b·e_i estimates the relative squared perturbation of the stream. A block that barely
  turns the stream (low BI, the ones ShortGPT removes) can take coarser weights. It serves the
  layer's own error, which does not see that; the end-to-end error already holds it. On stories260K
  at 3.88 bits (joint change of the final states on the calibration tokens) the weights lowered the
  layer error's 0.167 to 0.154; on the end-to-end error they gave 0.129 for 0.126 at 3.88 bits and
  0.324 for 0.332 at 3.0 (held-out perplexity 11.7 for 11.9, intervals overlapping): no consistent gain.
Sensitivity is s_b·e_i(c) (s_b = 1 without use_profile). The allocation solves the multiple-choice
knapsack
    min Σ_i s_b·e_i(c_i)   s.t.   Σ_i n_i·b_i(c_i) ≤ target_bits · Σ_i n_i
— the errors are not weighted by the layers' sizes n_i: each e_i is already the layer's whole
contribution (to the final states, or relative to its own output, which a relative error perturbs
alike whatever the layer's size), and Σ e_i is the additive estimate of the joint change. Weighting
by n_i spent bits on the large MLP layers that the small ones needed more: on stories260K the joint
change of the final states on the calibration tokens was 0.347 with it and 0.332 without at 3.0
bits, 0.158 and 0.126 at 3.88 (benchmarks/plan_objective.py, which also has MiniLM's). The
allocation is solved greedily: each layer starts at its cheapest candidate and the upgrades along
each layer's lower convex hull of (bits, error) are taken in order of error drop per extra bit while
they fit (the LP relaxation's order: Sinha & Zoltners, "The multiple-choice knapsack problem", Oper.
Res. 27(3), 1979, §2), then a local search applies the single change, or the pair of changes on two
layers, that lowers the objective most while it fits, until none is left. Every step checks the
budget, so the result never exceeds it.
"""
from __future__ import annotations

import copy
import dataclasses
import heapq
import math
import re
import time
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..architectures import find_blocks
from ..capture import _valid_tokens
from ..configs import check_positive, with_overrides
from ..errors import LeanformerError
from ..targets import Targets, dense_weight, select_linear
from .calibration import calibration_batches, measure_inputs
from .gptq import GPTQ
from .kashin import Kashin
from .quantization import PLAN_TYPES, NotConverged, QuantConfig, QuantizeReport, _linear_to_quantize, quantize


def default_candidates() -> list[QuantConfig]:
    """Kashin with 8-bit step sizes (scale_bits=8), and GPTQ in groups of 64 and per row with compact,
    searched grids (scale_bits=8, zero_point="integer", clip=True), each at 2, 3 and 4 bits.

    Kashin (vector form, closed codebook) stores b bits per weight plus its per-vector step sizes, one byte
    each with scale_bits=8. GPTQ's grids cost 8 + b bits per group (an 8-bit log-coded scale and a b-bit
    integer zero point, as the GPTQ reference stores its zeros), with each group's range shrunk to the one
    that rounds it best (the reference quantizer's mse option): b + 0.17 bits/weight in groups of 64 and
    b + (8 + b) / width per row, a ladder of honest costs from just over 2 to 4.2 bits that reaches every
    layer whatever its width (per row where 64 does not divide it: stories260K's 172-wide down_proj).
    float16 scales and minima would cost b + 0.5 on a 64-wide row, so at a 3-bit budget most layers could
    not afford 3 bits. GPTQ rounds with the Gram matrices the plan measures anyway, so it costs no extra
    calibration pass; its error is measured on the same tokens it was fitted to, an in-sample estimate that
    favours it slightly where a layer's inputs are wide beside the calibration tokens. HQQ and RTN are left
    out: they store the same per-group grids without compensating the rounding, and every candidate costs
    one quantization of every layer. Compared on a selection split that quant_bench.py never reads
    (benchmarks/plan_candidates.py), at 3.0 bits: stories260K perplexity 12.3 with this set, 16.2 with its
    GPTQ grids in float16, 18.6 with the earlier Kashin + HQQ + GPTQ (float16, groups of 64); MiniLM
    embedding cosine 0.979, 0.971 and 0.939 (uniform Kashin-3 at 3.13 bits: 13.2 and 0.910). On both
    models the plan chose no Kashin layer; Kashin stays a candidate for models where it wins a layer."""
    compact = {"scale_bits": 8, "zero_point": "integer", "clip": True}
    return ([Kashin(bits=b, scale_bits=8) for b in (2, 3, 4)]
            + [GPTQ(bits=b, group_size=64, **compact) for b in (2, 3, 4)]
            + [GPTQ(bits=b, group_size=None, **compact) for b in (2, 3, 4)])


SENSITIVITIES = ("output", "layer")
ERROR_KEY = {"output": "final_error", "layer": "output_error"}  # the table key each sensitivity reads
SENSITIVITY_TEXT = {"output": "relative change of the final hidden states", "layer": "relative output error"}


@dataclass
class PlanConfig:
    """How `plan` reads its calibration and which layers it plans (target_bits and candidates are
    arguments of `plan`)."""

    sensitivity: str = field(default="output", metadata={
        "help": "the error a candidate is charged for in a layer: output (relative squared change of the model's "
                "final hidden states with that layer alone quantized; one forward per layer and candidate) or "
                "layer (the layer's own relative output error on its calibration inputs; no extra forwards)"})
    use_profile: bool = field(default=False, metadata={
        "help": "scale each layer's error by its block's block influence (1 − mean cos(h_i, h_i+1), ShortGPT) "
                "relative to the mean over blocks: for sensitivity=layer, whose local error does not see how far a "
                "block moves the output (sensitivity=output measures it); off = every layer counts the same"})
    tokens: int = field(default=4096, metadata={"help": "calibration tokens the layer inputs are measured on"})
    max_seq_length: int = field(default=128, metadata={"help": "tokens per calibration sequence window"})
    batch_size: int = field(default=16, metadata={"help": "calibration sequences per forward pass"})
    targets: Targets = field(default=None, metadata={
        "help": "which Linear layers to plan, as quantize's targets (on the command line: the shared --targets "
                "flag)", "cli": False})

    def __post_init__(self):
        check_positive(self, "tokens", "batch_size")
        if self.sensitivity not in SENSITIVITIES:
            raise LeanformerError(f"sensitivity must be one of {', '.join(SENSITIVITIES)}, got {self.sensitivity!r}")
        if self.max_seq_length < 4:
            raise LeanformerError(f"max_seq_length must be at least 4, got {self.max_seq_length}")


def candidate_label(config: QuantConfig) -> str:
    """Short name of a candidate: method and bits, plus the fields that differ from the method's
    defaults, a group size as /g ("kashin3", "hqq2", "rtn4/g16", "gptq3/row", "kashin3 step_sizes=shared")."""
    base = type(config)(bits=config.bits)
    skip = {"bits", "targets", "cache", "filter_fn"}
    changed = [f.name for f in dataclasses.fields(config) if f.name not in skip and f.metadata.get("saved", True)
               and getattr(config, f.name) != getattr(base, f.name)]
    group = ("/row" if config.group_size is None else f"/g{config.group_size}") if "group_size" in changed else ""
    return " ".join([f"{config.method}{config.bits}{group}",
                     *(f"{n}={getattr(config, n)}" for n in changed if n != "group_size")])


@dataclass
class QuantPlan:
    """A per-layer quantization: `layers` maps each planned layer to its candidate label (None: no
    candidate could store it, it stays in full precision), `candidates` the labels' configs, `table`
    the measurements behind the choice. Apply it with `lf.quantize(model, plan)`."""

    target_bits: float
    candidates: dict[str, QuantConfig]
    layers: dict[str, str | None]
    table: dict[str, dict]
    average_bits: float  # predicted honest bits/weight over the planned layers
    info: dict = field(default_factory=dict)
    # what calibrated candidates (GPTQ) round with when the plan is applied, kept only where one needs it: the
    # calibration token batches (a sequential candidate measures its layers again on the model quantized so far),
    # XᵀX of each layer's inputs on the full-precision model (a non-sequential one). In memory only: to_dict leaves
    # them out, a plan read back from JSON re-plans
    calibration: list[dict[str, torch.Tensor]] | None = field(default=None, repr=False, compare=False)
    grams: dict[str, torch.Tensor] | None = field(default=None, repr=False, compare=False)

    def config_of(self, layer: str) -> QuantConfig | None:
        label = self.layers[layer]
        return None if label is None else self.candidates[label]

    def groups(self) -> dict[str, list[str]]:
        """{candidate label: its layers}, in candidate order; full-precision layers left out."""
        out = {label: [n for n, c in self.layers.items() if c == label] for label in self.candidates}
        return {label: names for label, names in out.items() if names}

    def apply(self, model: nn.Module, progress: bool = True) -> list[QuantizeReport]:
        """One `quantize` per chosen config, its targets exactly that config's layers (so `lf.save`
        records, and `lf.load` replays, ordinary quantize transforms). Calibrated configs go last: a
        sequential one (GPTQ's default) measures its layers' inputs stage by stage on the model with every
        other chosen layer already quantized, as GPTQ on its own would; a non-sequential one rounds with
        the plan's full-precision Gram matrices."""
        groups = self.groups()
        inputs = {label: _calibration_kept(self.candidates[label]) for label in groups}
        lacking = [label for label, kept in inputs.items() if kept and getattr(self, kept) is None]
        if lacking:
            raise LeanformerError(f"this plan chose {', '.join(lacking)}, which rounds with the layers' calibration "
                                  "inputs; a plan keeps them only in the process that measured it (not in "
                                  "plan.json): run lf.plan again to apply it")
        reports = []
        # calibrated configs last; the sort is stable, so candidate order within each kind
        for label in sorted(groups, key=lambda lb: inputs[lb] is not None):
            names = groups[label]
            targets: Targets = list(names)
            if set(select_linear(model, targets)) != set(names):  # a full name can also end another's name
                targets = "|".join(map(re.escape, names))
            config = dataclasses.replace(self.candidates[label], targets=targets, filter_fn=None)
            if inputs[label] == "calibration":
                config = dataclasses.replace(config, calibration=self.calibration)
            # it warns of any layer it could not store
            reports.append(quantize(model, config, progress=progress,
                                    grams=self.grams if inputs[label] == "grams" else None))
        return reports

    def with_target(self, target_bits: float, use_profile: bool | None = None,
                    sensitivity: str | None = None) -> "QuantPlan":
        """The same measurements allocated for another budget (with use_profile=False without the
        importance weights; with sensitivity="layer" by the layers' own output errors), quantizing
        nothing again: for sweeps over targets and ablations."""
        _check_target(target_bits)
        use = bool(self.info.get("use_profile")) if use_profile is None else use_profile
        if use and not self.info.get("use_profile"):
            raise LeanformerError("this plan was measured with use_profile=False and holds no importance to weigh "
                                  "by; plan again with use_profile=True")
        kind = self.info.get("sensitivity", "layer") if sensitivity is None else sensitivity
        if kind not in SENSITIVITIES:
            raise LeanformerError(f"sensitivity must be one of {', '.join(SENSITIVITIES)}, got {kind!r}")
        if kind == "output" and not any("final_error" in m for row in self.table.values()
                                        for m in row["candidates"].values()):
            raise LeanformerError("this plan was measured with sensitivity='layer' and holds no end-to-end errors; "
                                  "plan again with sensitivity='output'")
        table = copy.deepcopy(self.table)
        info = dict(self.info, use_profile=use, sensitivity=kind)
        if not use:
            info.update(importance="none (every layer 1)", block_influence=None)
            for row in table.values():
                row["importance"] = 1.0
        for row in table.values():
            for m in row["candidates"].values():
                if ERROR_KEY[kind] in m:
                    m["sensitivity"] = row["importance"] * m[ERROR_KEY[kind]]
        layers, average, bounds = _choose(table, list(self.candidates), target_bits)
        return QuantPlan(float(target_bits), dict(self.candidates), layers, table, average, {**info, **bounds},
                         self.calibration, self.grams)

    def to_dict(self) -> dict:
        return {"target_bits": self.target_bits, "average_bits": self.average_bits,
                "candidates": {label: c.to_dict() for label, c in self.candidates.items()},
                "layers": dict(self.layers), "table": self.table, "info": self.info}

    @classmethod
    def from_dict(cls, d: dict) -> "QuantPlan":
        return cls(target_bits=d["target_bits"], average_bits=d["average_bits"],
                   candidates={label: QuantConfig.from_dict(c) for label, c in d["candidates"].items()},
                   layers=dict(d["layers"]), table=d["table"], info=d.get("info", {}))

    def __str__(self) -> str:
        labels = list(self.candidates)
        width = max(48, *(len(n) for n in self.layers))
        cols = [max(9, len(label)) for label in labels]
        chosen_width = max(6, *(len(label) for label in labels))
        head = (f"{'layer':<{width}} {'weights':>9} {'import.':>7} {'chosen':>{chosen_width}} {'bits':>6} │ "
                + " ".join(f"{label:>{w}}" for label, w in zip(labels, cols)))
        lines = [f"quantization plan: target {self.target_bits:g} bits/weight, predicted {self.average_bits:.3f} "
                 "(honest: every stored byte counted)",
                 f"per candidate: {SENSITIVITY_TEXT[self.info.get('sensitivity', 'layer')]} × importance "
                 "(* = chosen, - = not eligible)", head,
                 "─" * len(head)]
        for name, chosen in self.layers.items():
            row = self.table[name]
            cells = []
            for label, w in zip(labels, cols):
                m = row["candidates"].get(label, {})
                text = "-" if "sensitivity" not in m else ("*" if label == chosen else "") + f"{m['sensitivity']:.2e}"
                cells.append(f"{text:>{w}}")
            bits = row["candidates"][chosen]["bits"] if chosen else row["full_precision_bits"]
            lines.append(f"{name:<{width}} {row['n_weights']:>9} {row['importance']:>7.3f} "
                         f"{chosen or 'full':>{chosen_width}} {bits:>6.3f} │ " + " ".join(cells))
        counts = {label: len(names) for label, names in self.groups().items()}
        lines.append("chosen: " + ", ".join(f"{label} × {n}" for label, n in counts.items())
                     + (f", full precision × {sum(c is None for c in self.layers.values())}"
                        if None in self.layers.values() else ""))
        return "\n".join(lines)


PLAN_TYPES.append(QuantPlan)


def _calibration_kept(config: QuantConfig) -> str | None:
    """Which of a QuantPlan's in-memory calibration fields `config` rounds with when applied: "calibration"
    (a sequential calibrated method, measured again on the model quantized so far), "grams" (the plan's own
    Gram matrices), or None (no calibration)."""
    if not config.CALIBRATED:
        return None
    return "calibration" if getattr(config, "sequential", False) else "grams"


def _measure_candidates(name: str, module: nn.Module, gram: torch.Tensor, importance: float,
                        candidates: dict[str, QuantConfig], bar, final: "_FinalStates | None" = None) -> dict:
    """One layer's row of the table: per candidate its honest bits, relative output error
    tr(D G Dᵀ) / tr(W G Wᵀ), D = W − Ŵ, G = XᵀX, and with `final` the relative change of the final
    hidden states with Ŵ in this layer alone; or why it is not eligible. Sensitivity: importance ×
    the final-state error if measured, else × the output error."""
    w = dense_weight(module).detach().float().cpu().contiguous()  # as quantize() reads it
    wd = w.double()
    signal = float(((wd @ gram) * wd).sum())
    row = {"n_weights": w.numel(), "full_precision_bits": 8.0 * module.weight.element_size(), "candidates": {}}
    for label, c in candidates.items():
        bar.update()
        try:
            tensors, header = c.stored_form(w, name, gram)
        except (NotConverged, LeanformerError) as e:  # not eligible here (no convergence, a group size that does not fit)
            row["candidates"][label] = {"ineligible": str(e)}
            continue
        w_hat = type(c).dequantize(tensors, header)
        d = wd - w_hat.double()
        out_err = float(((d @ gram) * d).sum()) / signal if signal > 0 else 0.0
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        m = {"bytes": nbytes, "bits": 8.0 * nbytes / w.numel(), "output_error": out_err,
             "weight_error": float(d.norm() / wd.norm().clamp_min(1e-30))}
        if final is not None:
            m["final_error"] = final.error_with(module, w_hat)
        m["sensitivity"] = importance * m["final_error" if final is not None else "output_error"]
        row["candidates"][label] = m
    return row


class _FinalStates:
    """The model's final hidden states on the calibration batches (padding removed), and the relative
    squared change ‖H' − H‖² / ‖H‖² when one layer's weight is replaced."""

    def __init__(self, model: nn.Module, batches_: list[dict]):
        self.model, self.batches = model, batches_
        self.device = next(model.parameters()).device
        self.reference = self._run()
        self.energy = sum(float(h.double().pow(2).sum()) for h in self.reference)

    @torch.no_grad()
    def _run(self) -> list[torch.Tensor]:
        # the base model's last hidden state: the encoder's output (what mean pooling reads), a decoder's
        # final-norm output (what the LM head reads); a task head on top is left out
        body = getattr(self.model, "base_model", self.model)
        out = []
        for batch in self.batches:
            mask = batch["attention_mask"].to(self.device).bool()
            result = body(input_ids=batch["input_ids"].to(self.device), attention_mask=mask.long())
            h = result.last_hidden_state if hasattr(result, "last_hidden_state") else result[0]
            out.append(_valid_tokens(h, mask, "final hidden state").float())
        return out

    @torch.no_grad()
    def error_with(self, module: nn.Module, w_hat: torch.Tensor) -> float:
        weight = dense_weight(module)  # a view of the stored weight: writing it changes the layer
        saved = weight.detach().clone()
        try:
            weight.data.copy_(w_hat.to(weight.dtype))
            changed = self._run()
        finally:
            weight.data.copy_(saved)
        diff = sum(float((a.double() - b.double()).pow(2).sum()) for a, b in zip(changed, self.reference))
        return diff / self.energy if self.energy > 0 else 0.0


def _block_of(name: str, path: str, n_blocks: int) -> int | None:
    prefix = path + "."
    if not name.startswith(prefix):
        return None
    head = name[len(prefix):].split(".", 1)[0]
    return int(head) if head.isdigit() and int(head) < n_blocks else None


# --------------------------------------------------------------------------------------------
# Allocation: multiple-choice knapsack


def _lower_hull(cost: Sequence[float], err: Sequence[float], options: Sequence[int]) -> list[int]:
    """The options on the lower convex hull of (cost, error): increasing cost, decreasing error,
    decreasing error drop per extra cost."""
    hull: list[int] = []
    for j in sorted(options, key=lambda j: (cost[j], err[j])):
        if hull and err[j] >= err[hull[-1]]:
            continue  # costs at least as much, errs at least as much
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            if (err[a] - err[b]) * (cost[j] - cost[b]) <= (err[b] - err[j]) * (cost[b] - cost[a]):
                hull.pop()  # b buys less per bit than going straight from a to j
            else:
                break
        hull.append(j)
    return hull


def allocate(costs: Sequence[Sequence[float]], errors: Sequence[Sequence[float]], budget: float,
             eligible: Sequence[Sequence[int]] | None = None) -> list[int]:
    """One option per item minimising Σ errors[i][c_i] with Σ costs[i][c_i] ≤ budget (the caller
    checks that the cheapest choice fits). Greedy along each item's lower convex hull by error drop
    per extra cost, then a local search over single and paired changes (_improve)."""
    items = range(len(costs))
    options = [list(eligible[i]) if eligible is not None else list(range(len(costs[i]))) for i in items]
    hulls = [_lower_hull(costs[i], errors[i], options[i]) for i in items]
    choice = [h[0] for h in hulls]
    spent = sum(costs[i][choice[i]] for i in items)
    step = [0] * len(hulls)
    heap = []

    def push(i):
        if step[i] + 1 < len(hulls[i]):
            a, b = hulls[i][step[i]], hulls[i][step[i] + 1]
            heapq.heappush(heap, (-(errors[i][a] - errors[i][b]) / (costs[i][b] - costs[i][a]), i))

    for i in items:
        push(i)
    while heap:
        _, i = heapq.heappop(heap)
        nxt = hulls[i][step[i] + 1]
        extra = costs[i][nxt] - costs[i][choice[i]]
        if spent + extra <= budget:
            spent += extra
            choice[i] = nxt
            step[i] += 1
            push(i)
    return _improve(costs, errors, budget, options, choice)


def _improve(costs, errors, budget: float, options: list[list[int]], choice: list[int]) -> list[int]:
    """Local search from a feasible choice: repeatedly apply the single change, or the pair of changes
    on two items (upgrade one, downgrade another), that lowers the total error most while the total
    cost stays within budget; stops when no such move is left. Pairs close most of the gap the greedy
    leaves where one upgrade does not fit (few items, coarse costs)."""
    item = np.array([i for i in range(len(options)) for _ in options[i]])
    option = np.array([j for i in range(len(options)) for j in options[i]])
    cost = np.array([costs[i][j] for i, j in zip(item, option)], dtype=np.float64)
    err = np.array([errors[i][j] for i, j in zip(item, option)], dtype=np.float64)
    same = item[:, None] == item[None, :]
    choice = list(choice)
    while True:
        current = np.array([choice[i] for i in item])
        base = np.array([costs[i][c] for i, c in zip(item, current)], dtype=np.float64)
        dc = cost - base  # cost change of moving item[m] to option[m]
        de = err - np.array([errors[i][c] for i, c in zip(item, current)], dtype=np.float64)
        slack = budget - sum(costs[i][c] for i, c in enumerate(choice))
        single = np.where((dc <= slack) & (de < 0), de, np.inf)
        pair = de[:, None] + de[None, :]
        pair = np.where(~same & (dc[:, None] + dc[None, :] <= slack) & (pair < 0), pair, np.inf)
        m = int(np.argmin(single))
        a, b = np.unravel_index(int(np.argmin(pair)), pair.shape)
        if not (np.isfinite(single[m]) or np.isfinite(pair[a, b])):
            return choice
        if single[m] <= pair[a, b]:
            choice[item[m]] = int(option[m])
        else:
            choice[item[a]], choice[item[b]] = int(option[a]), int(option[b])


# --------------------------------------------------------------------------------------------
# The verb


def plan(model: nn.Module, target_bits: float = 3.0, *, calibration=None, tokenizer=None,
         candidates: Sequence[QuantConfig] | None = None, profile=None, config: PlanConfig | None = None,
         progress: bool = True, **overrides) -> QuantPlan:
    """Choose each target layer's quantization among `candidates` (default: `default_candidates()`)
    so the average honest bits/weight stays ≤ `target_bits` and the sum over layers of their errors
    (× importance with use_profile) is smallest (module docstring). `calibration`: texts, (text_a,
    text_b) pairs, a Task (its train split) or token batches; `profile`: an `lf.inspect` Profile of this model whose
    block influence weighs the layers (default: measured on the calibration tokens, the same
    definition); keyword overrides set PlanConfig fields (sensitivity, use_profile, tokens, targets, …)."""
    config = with_overrides(PlanConfig, config, overrides)
    _check_target(target_bits)
    candidates = list(default_candidates() if candidates is None else candidates)
    if not candidates:
        raise LeanformerError("candidates is empty; give QuantConfig objects (e.g. [lf.Kashin(bits=2), "
                              "lf.Kashin(bits=4)]) or None for the default set")
    labelled: dict[str, QuantConfig] = {}
    for c in candidates:
        if not isinstance(c, QuantConfig):
            raise LeanformerError(f"candidates must be quantization configs (Kashin, RTN, HQQ, GPTQ), got {type(c).__name__}")
        if c.CALIBRATED and c.calibration is not None:
            raise LeanformerError(f"candidate {candidate_label(c)} carries its own calibration; the plan hands every "
                                  "calibrated candidate the Gram matrices it measures on plan(calibration=…): leave "
                                  "the candidate's out")
        if c.targets is not None or c.filter_fn is not None:
            raise LeanformerError(f"candidate {candidate_label(c)} sets targets/filter_fn; candidates choose how to "
                                  "store a layer, not which layers: give the layers with plan(…, targets=…)")
        label = candidate_label(c)
        if label in labelled:
            raise LeanformerError(f"candidate {label} is listed twice")
        labelled[label] = c
    started = time.perf_counter()
    names = select_linear(model, config.targets)  # no target layers: a clear error naming the model's layers
    modules = dict(_linear_to_quantize(model, n) for n in names)  # already-quantized layers fail here
    by_target = dict(zip(names, modules.values()))
    batches_ = calibration_batches(calibration, tokenizer, config, "plan")

    # blocks are needed only to weigh layers by their block (a model without a block list can still be
    # planned with use_profile=False)
    if profile is not None and not config.use_profile:
        raise LeanformerError("profile= gives the block influence that use_profile=True weighs the layers by; pass "
                              "use_profile=True with it (the default end-to-end sensitivity needs neither)")
    blocks, path = find_blocks(model) if config.use_profile else ([], "")
    if profile is not None:  # (use_profile is on: checked above)
        influence = [t["block_influence"] for t in profile.transitions]
        if len(influence) != len(blocks):
            raise LeanformerError(f"the profile describes {len(influence)} blocks but the model has {len(blocks)}; "
                                  "pass the lf.inspect profile of this model (or profile=None to measure it)")
    grams, measured, n_tokens, _ = measure_inputs(model, by_target, batches_, config.use_profile and profile is None,
                                               progress, "plan")
    if n_tokens < config.tokens / 4:  # each layer's error is an estimate from these tokens; the allocation follows it
        warnings.warn(f"plan: the calibration gave {n_tokens} tokens, under a quarter of the {config.tokens} it reads "
                      "(tokens=); per-layer errors measured on so few tokens are noisy estimates, and the allocation "
                      "follows their noise. Give more calibration text", stacklevel=2)
    if config.use_profile and profile is None:
        influence = measured
    if config.use_profile:
        mean = sum(influence) / len(influence)
        block_importance = [b / mean if mean > 0 else 1.0 for b in influence]

    was_training = model.training
    model.eval()  # dropout off: the same forward for the reference and every replaced layer
    try:
        final = _FinalStates(model, batches_) if config.sensitivity == "output" else None
        table = _measure_table(names, by_target, grams, labelled, final, path, len(blocks),
                               block_importance if config.use_profile else None, progress)
    finally:
        model.train(was_training)

    layers, average, bounds = _choose(table, list(labelled), target_bits)
    info = {"seconds": time.perf_counter() - started, "calibration_tokens": n_tokens,
            "sensitivity": config.sensitivity, "use_profile": config.use_profile,
            "importance": ("block influence (Men et al., ShortGPT 2024, §3.1) over its mean, "
                           + ("from the given profile" if profile is not None else "measured on the calibration tokens")
                           if config.use_profile else "none (every layer 1)"),
            "block_influence": influence if config.use_profile else None,
            "config": dataclasses.asdict(config), **bounds}
    kept = {_calibration_kept(c) for c in labelled.values()}
    return QuantPlan(target_bits=float(target_bits), candidates=labelled, layers=layers, table=table,
                     average_bits=average, info=info, calibration=batches_ if "calibration" in kept else None,
                     grams=grams if "grams" in kept else None)


def _measure_table(names: list[str], modules: dict[str, nn.Module], grams: dict[str, torch.Tensor],
                   candidates: dict[str, QuantConfig], final: _FinalStates | None, path: str, n_blocks: int,
                   block_importance: list[float] | None, progress: bool) -> dict[str, dict]:
    table: dict[str, dict] = {}
    with tqdm(total=len(names) * len(candidates), desc="plan: measure candidates", disable=not progress,
              leave=False) as bar:
        for n in names:
            block = _block_of(n, path, n_blocks) if block_importance is not None else None
            importance = block_importance[block] if block is not None else 1.0  # outside the blocks (a head): 1
            table[n] = {"block": block, "importance": importance,
                        **_measure_candidates(n, modules[n], grams[n], importance, candidates, bar, final)}
    return table


def _check_target(target_bits) -> None:
    if isinstance(target_bits, bool) or not isinstance(target_bits, (int, float)) or not math.isfinite(target_bits) \
            or target_bits <= 0:
        raise LeanformerError(f"target_bits must be a positive number of bits per weight, got {target_bits!r}")


def _choose(table: dict[str, dict], labels: list[str], target_bits: float) -> tuple[dict, float, dict]:
    """(layer → label, predicted average bits, bounds and full-precision layers) from a measured table.
    Layers no candidate can store count at their full-precision bits."""
    names = list(table)
    planned = [n for n in names if any("bytes" in table[n]["candidates"][lb] for lb in labels)]
    kept = [n for n in names if n not in planned]
    n_total = sum(table[n]["n_weights"] for n in names)
    fixed_bits = sum(table[n]["n_weights"] * table[n]["full_precision_bits"] for n in kept)
    costs, errors, eligible = [], [], []
    for n in planned:
        cands = table[n]["candidates"]
        costs.append([8 * cands[lb].get("bytes", 0) for lb in labels])
        errors.append([cands[lb].get("sensitivity", math.inf) for lb in labels])  # Σ e_i: not weighted by size
        eligible.append([j for j, lb in enumerate(labels) if "bytes" in cands[lb]])
    cheapest = fixed_bits + sum(min(c[j] for j in e) for c, e in zip(costs, eligible))
    largest = fixed_bits + sum(max(c[j] for j in e) for c, e in zip(costs, eligible))
    if cheapest > target_bits * n_total:
        minimum = cheapest / n_total
        raise LeanformerError(
            f"target_bits {target_bits:g} is below {minimum:.3f}, the fewest honest bits/weight these candidates "
            f"reach on this model's {len(names)} layers (every layer at its cheapest eligible candidate"
            + (f"; {len(kept)} layers no candidate can store count at full precision" if kept else "")
            + f"). Give target_bits ≥ {math.ceil(minimum * 1000) / 1000:.3f}, or add cheaper candidates")
    if target_bits * n_total >= largest:
        choice = [min(e, key=lambda j: errors[i][j]) for i, e in enumerate(eligible)]
        average = (fixed_bits + sum(costs[i][j] for i, j in enumerate(choice))) / n_total
        warnings.warn(f"target_bits {target_bits:g} is at or above {largest / n_total:.3f}, the honest bits/weight of "
                      "every layer's largest candidate: every layer gets its most accurate candidate "
                      f"(predicted {average:.3f} bits/weight)", stacklevel=3)
    else:
        choice = allocate(costs, errors, target_bits * n_total - fixed_bits, eligible)
    layers: dict[str, str | None] = {n: None for n in names}
    for n, j in zip(planned, choice):
        layers[n] = labels[j]
    spent = fixed_bits + sum(costs[i][j] for i, j in enumerate(choice))
    assert spent <= target_bits * n_total, "the allocation exceeded its budget"
    bounds = {"full_precision": {n: "; ".join(f"{lb}: {table[n]['candidates'][lb]['ineligible']}" for lb in labels)
                                 for n in kept},
              "min_bits": cheapest / n_total, "max_bits": largest / n_total, "n_weights": n_total}
    return layers, spent / n_total, bounds

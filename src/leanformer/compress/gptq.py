"""GPTQ (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", ICLR 2023): round a layer's weights one input column at a time and fold each column's
rounding error into the columns not yet rounded, through the inverse Hessian of the layer's output
error ‖X Wᵀ − X Ŵᵀ‖², H = XᵀX on calibration inputs X (Algorithm 1: the upper Cholesky factor of H⁻¹,
with lazy batch updates of 128 columns).

Stored per layer: exactly RTN's form (b-bit codes, per group of `group_size` inputs a float16 scale
and float16 minimum, Ŵ = s q + zero), so decoding, the fused kernels, save/load and the size
accounting are RTN's; only the choice of codes differs. Honest size: bits + 32 / group_size.

- act_order (the authors' `--act-order` with `--static-groups`, IST-DASLab/gptq): columns are rounded
  in order of decreasing H_jj (the inputs with the most energy first, while the most columns are left
  to absorb their error); each group's scale and minimum are fixed from the original weight before
  any column moves, so the groups stay the consecutive runs of inputs the stored form reads. Without
  it, columns go left to right and each group's grid is set from the columns as updated so far (the
  paper's default).
- damp: λ = damp · mean(diag H) is added to H's diagonal (the paper's 1 %); where H + λI is still not
  positive definite the damping grows tenfold, twice, before the layer is left in full precision.
- sequential (the reference's order, transformers' GPTQConfig true_sequential): each layer's
  Hessian is measured on the inputs it receives once every layer before it is quantized, so later
  layers also absorb the earlier ones' errors. Layers that read one tensor (q, k, v; gate, up) form
  one stage: one forward pass over the calibration tokens per stage. Off: one pass, every Hessian
  from the full-precision model. Gram matrices handed over (lf.plan's, from the full-precision
  model) are used as they are.
- Inputs the calibration never reached (H_jj = 0) keep their weights and take no part in the
  compensation (the reference zeroes them, which would change the model on other inputs).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Iterator

import torch

from ..errors import LeanformerError
from .calibration import calibration_batches, measure_inputs
from .packing import pack_bits
from .quantization import AffineQuantConfig, NotConverged, check_group_size, group_size_field, scale_bits_field
from .rtn import (check_grid_fields, clip_field, grid_codes, grid_header, grid_log_range, grid_scale, grid_tensors,
                  grid_values, minmax_grid, zero_point_field)

BLOCK = 128  # columns per lazy batch update (Algorithm 1)


@dataclass
class HessianCalibration:
    """What a method that rounds against the Hessian of a layer's output error reads (GPTQ, KashinGPTQ): the
    calibration input and how to read it, the damping, the column order and whether stages are sequential. Its
    `compensated_rounding` is Algorithm 1's loop; the method supplies the rounding of one column."""
    act_order: bool = field(default=True, metadata={
        "help": "round the input columns in order of decreasing Hessian diagonal (the inputs with the most energy "
                "first, while the most columns are left to absorb their error); off = left to right"})
    damp: float = field(default=0.01, metadata={
        "help": "damping added to the Hessian's diagonal, as a fraction of its mean"})
    sequential: bool = field(default=True, metadata={
        "help": "measure each layer's Hessian with the layers before it already quantized (one calibration pass "
                "per group of layers that read one input); off = one pass on the full-precision model"})
    calibration: object = field(default=None, repr=False, compare=False, metadata={
        "help": "calibration input the layers' Hessians are measured on: texts, (text_a, text_b) pairs, a Task "
                "(its train split) or token batches (on the command line: --text, --dataset or --task)",
        "cli": False, "saved": False})
    tokenizer: object = field(default=None, repr=False, compare=False, metadata={
        "help": "the model's tokenizer, to read calibration text", "cli": False, "saved": False})
    tokens: int = field(default=4096, metadata={
        "help": "calibration tokens (on the command line: --tokens)", "cli": False})
    max_seq_length: int = field(default=128, metadata={
        "help": "tokens per calibration window (on the command line: --max-seq-length)", "cli": False})
    batch_size: int = field(default=16, metadata={
        "help": "calibration windows per forward pass (on the command line: --batch-size)", "cli": False})

    CALIBRATED: ClassVar[bool] = True

    def __post_init__(self):  # after QuantConfig's checks (the next class in the method's order)
        super().__post_init__()
        if not 0 <= self.damp < 1:
            raise LeanformerError(f"damp must be in [0, 1), got {self.damp!r}")
        for name in ("tokens", "max_seq_length", "batch_size"):
            if getattr(self, name) <= 0:
                raise LeanformerError(f"{name} must be positive, got {getattr(self, name)!r}")

    def stages(self, model: torch.nn.Module, modules: dict[str, torch.nn.Module], grams: dict[str, torch.Tensor],
               progress: bool) -> Iterator[tuple[list[str], dict[str, torch.Tensor]]]:
        """(layer names, their Gram matrices) in the order quantize() should round them: one stage of every
        layer if `grams` covers them all or sequential is off, else one per group of layers reading one input,
        in forward order, each measured when the iterator reaches it (after the stages before it are in
        the model). The calibration input is read here, before any layer changes."""
        missing = {n: m for n, m in modules.items() if n not in grams}
        if not missing:
            return iter([(list(modules), grams)])
        batches = calibration_batches(self.calibration, self.tokenizer, self, type(self).__name__)
        if not self.sequential:
            return iter([(list(modules), {**grams, **self._measure(model, missing, batches, progress)})])
        return self._sequential_stages(model, modules, grams, batches, progress)

    def _sequential_stages(self, model, modules, grams, batches, progress):
        given = [n for n in modules if n in grams]
        if given:
            yield given, grams
        rest = {n: m for n, m in modules.items() if n not in grams}
        for stage in measure_inputs(model, rest, batches[:1], False, False, type(self).__name__)[3]:  # forward order
            yield stage, self._measure(model, {n: modules[n] for n in stage}, batches, progress)

    def _measure(self, model, modules, batches, progress) -> dict[str, torch.Tensor]:
        purpose = type(self).__name__
        grams, _, n_tokens, _ = measure_inputs(model, modules, batches, False, progress, purpose)
        if n_tokens < self.tokens / 4:
            warnings.warn(f"{purpose}: the calibration gave {n_tokens} tokens, under a quarter of the {self.tokens} it "
                          "reads (tokens=); a Hessian from so few tokens fits the rounding to them. Give more "
                          "calibration text", stacklevel=4)
        return grams

    def compensated_rounding(self, weight: torch.Tensor, gram: torch.Tensor, name: str,
                             round_column: Callable[[int, int, torch.Tensor], torch.Tensor], block: int = BLOCK) -> None:
        """Algorithm 1: round the (out, in) weight's columns one at a time (in act order or left to right), each
        column's error folded into the columns not yet rounded through the upper Cholesky factor of H⁻¹, with lazy
        updates `block` columns at a time. round_column(j, col, work) returns the rounded values of input column
        `col`, the j-th rounded; work is the weight in rounding order as updated so far (its column j is the one
        to round; the callback reads it and stores its own codes)."""
        out_f, in_f = weight.shape
        if tuple(gram.shape) != (in_f, in_f):
            raise LeanformerError(f"layer {name}: the Gram matrix is {tuple(gram.shape)}, its inputs are {in_f} wide")
        h = gram.detach().to("cpu", torch.float64).clone()
        h.diagonal()[h.diagonal() == 0] = 1.0  # an input calibration never reached: no coupling to compensate through
        order = (torch.argsort(h.diagonal(), descending=True, stable=True) if self.act_order
                 else torch.arange(in_f))
        hinv = _inverse_cholesky(h[order][:, order], self.damp, name)
        work = weight.float()[:, order]  # a copy, its columns in the order they are rounded
        for i1 in range(0, in_f, block):
            i2 = min(i1 + block, in_f)
            errors = torch.empty(out_f, i2 - i1)
            for j in range(i1, i2):
                err = (work[:, j] - round_column(j, int(order[j]), work)) / hinv[j, j]
                work[:, j:i2] -= err[:, None] * hinv[j, j:i2]
                errors[:, j - i1] = err
            work[:, i2:] -= errors @ hinv[i1:i2, i2:]


@dataclass
class GPTQ(HessianCalibration, AffineQuantConfig):
    group_size: int | None = group_size_field(128)  # the paper's and transformers' GPTQConfig's usual choice
    scale_bits: int = scale_bits_field()
    zero_point: str = zero_point_field()
    clip: bool = clip_field()

    method: ClassVar[str] = "gptq"
    SUPPORTED_BITS: ClassVar[tuple[int, ...]] = (2, 3, 4, 5, 6, 8)

    def __post_init__(self):
        super().__post_init__()
        check_grid_fields(self)

    def quantize_weight(self, weight: torch.Tensor, name: str, gram: torch.Tensor):
        out_f, in_f = weight.shape
        g = check_group_size(self.group_size, in_f, name)
        groups = weight.float().reshape(out_f, -1, g)
        # 8-bit scales: their log range is fixed from the original weight's groups (a grid set later, from
        # updated columns, takes the nearest code in it)
        log_range = grid_log_range(groups, self.bits, self.zero_point) if self.scale_bits == 8 else None
        scale = torch.empty(out_f, in_f // g, dtype=torch.float16 if log_range is None else torch.uint8)
        zero = torch.empty(out_f, in_f // g, dtype=torch.float16)
        if self.act_order:  # static groups: every grid fixed from the original weight
            s, z = minmax_grid(groups, self.bits, self.zero_point, log_range, self.clip)
            scale[:], zero[:] = s[..., 0], z[..., 0]
        codes = torch.empty(out_f, in_f)

        def round_column(j: int, col: int, work: torch.Tensor) -> torch.Tensor:
            if not self.act_order and col % g == 0:  # a group's grid from its columns as updated so far
                s, z = minmax_grid(work[:, j:j + g], self.bits, self.zero_point, log_range, self.clip)
                scale[:, col // g], zero[:, col // g] = s[:, 0], z[:, 0]
            s, z = grid_scale(scale[:, col // g], log_range).float(), zero[:, col // g].float()
            codes[:, col] = grid_codes(work[:, j], s, z, self.bits, self.zero_point)
            return grid_values(codes[:, col], s, z, self.zero_point)

        # a lazy batch holds whole groups, so a grid set at a group's first column sees all earlier updates
        self.compensated_rounding(weight, gram, name, round_column,
                                  BLOCK if self.act_order else max(1, BLOCK // g) * g)
        return ({"packed": pack_bits(codes, self.bits),
                 **grid_tensors(scale, zero, self.bits, self.zero_point, log_range)},
                {"group_size": g, "col_scale": False, **grid_header(self)})


def _inverse_cholesky(h: torch.Tensor, damp: float, name: str) -> torch.Tensor:
    """Upper Cholesky factor of (H + λI)⁻¹ in float32 (float64 while inverting)."""
    mean = float(h.diagonal().mean())
    for factor in (1.0, 10.0, 100.0):
        damped = h + (damp * factor * mean) * torch.eye(len(h), dtype=h.dtype)
        try:
            inverse = torch.cholesky_inverse(torch.linalg.cholesky(damped))
            return torch.linalg.cholesky(inverse, upper=True).float()
        except torch.linalg.LinAlgError:
            continue
    raise NotConverged(f"layer {name}: the Hessian of its inputs is not positive definite even with {100 * damp:g}x "
                       "its mean diagonal added")

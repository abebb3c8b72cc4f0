"""RTN: round-to-nearest, asymmetric min-max per group of `group_size` consecutive input weights.

Stored per layer: b-bit codes (packed), and per group a scale and a zero; with col_scale, one float16
per input column too (Kashin's column scaling, offered to the baseline). The group's grid is stored
(`minmax_grid`, shared with GPTQ) as
- scale_bits=16, zero_point="float16" (the default): a float16 scale and the group's float16 minimum,
  Ŵ = s q + min: bits + 32 / group_size bits per weight;
- scale_bits=8: the scale as an 8-bit log code between the layer's smallest and largest scale (8 bytes
  per layer for that range; relative precision (hi − lo)/508 octaves, as Kashin's scale_bits);
- zero_point="integer": an integer zero point z in code units stored in `bits` bits, Ŵ = s (q − z), of a
  grid that also holds 0 (the GPTQ reference's quantizer and qzeros, IST-DASLab/gptq quant.py).
  With both: bits + (8 + bits) / group_size, e.g. 3.17 bits per weight at 3 bits on 64-weight rows.
(+ 16 / out_features with col_scale.) With clip, each group's range is the min-max range scaled towards 0
by the factor, of 1, 0.99, …, 0.21, that rounds the group best (the GPTQ reference quantizer's mse option:
least Σ|Ŵ − W|^2.4): at 2 bits a min-max grid spends two of its four levels on a group's two extremes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from ..errors import LeanformerError
from .packing import SCALE_BITS, fp16, log8_decode, log8_encode, pack_bits
from .quantization import (AffineQuantConfig, check_group_size, col_scale_field, column_rms, group_size_field,
                           scale_bits_field)

ZERO_POINTS = ("float16", "integer")


def zero_point_field():
    """RTN's and GPTQ's `zero_point` field (one help text)."""
    return field(default="float16", metadata={
        "help": "each group's zero: float16 (the group's minimum) or integer (a zero point in code units, stored "
                "in `bits` bits, of a grid that also holds 0, as GPTQ's reference stores it)",
        "choices": ZERO_POINTS})


def clip_field():
    """RTN's and GPTQ's `clip` field (one help text)."""
    return field(default=False, metadata={
        "help": "search each group's range: scale it towards 0 by 1, 0.99, ..., 0.21, keeping the one that "
                "rounds the group best (least sum of |error|^2.4; the GPTQ reference quantizer's mse option); "
                "off = the full min-max range"})


@dataclass
class RTN(AffineQuantConfig):
    group_size: int | None = group_size_field(128)
    col_scale: bool = col_scale_field(False)
    scale_bits: int = scale_bits_field()
    zero_point: str = zero_point_field()
    clip: bool = clip_field()

    method: ClassVar[str] = "rtn"
    SUPPORTED_BITS: ClassVar[tuple[int, ...]] = (2, 3, 4, 5, 6, 8)

    def __post_init__(self):
        super().__post_init__()
        check_grid_fields(self)

    def quantize_weight(self, weight: torch.Tensor, name: str):
        out_f, in_f = weight.shape
        g = check_group_size(self.group_size, in_f, name)
        tensors = {}
        if self.col_scale:
            tensors["col_scale"] = column_rms(weight)
            weight = weight / tensors["col_scale"].float()
        w = weight.reshape(-1, g)
        log_range = grid_log_range(w, self.bits, self.zero_point) if self.scale_bits == 8 else None
        scale, zero = minmax_grid(w, self.bits, self.zero_point, log_range, self.clip)
        codes = grid_codes(w, grid_scale(scale, log_range), zero, self.bits, self.zero_point)
        tensors.update(packed=pack_bits(codes, self.bits),
                       **grid_tensors(scale, zero, self.bits, self.zero_point, log_range))
        return tensors, {"group_size": g, "col_scale": self.col_scale, **grid_header(self)}


def check_grid_fields(config) -> None:
    """RTN's and GPTQ's scale_bits and zero_point."""
    if config.scale_bits not in SCALE_BITS:
        raise LeanformerError(f"{type(config).__name__}: scale_bits must be one of {', '.join(map(str, SCALE_BITS))}, "
                              f"got {config.scale_bits!r}")
    if config.zero_point not in ZERO_POINTS:
        raise LeanformerError(f"{type(config).__name__}: zero_point must be one of {', '.join(ZERO_POINTS)}, "
                              f"got {config.zero_point!r}")


def grid_header(config) -> dict:
    return {"scale_bits": config.scale_bits, "zero_point": config.zero_point, "clip": config.clip}


def _range(w: torch.Tensor, zero_point: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Each group's lowest and highest value: the range a min-max grid spans."""
    lo, hi = w.min(-1, keepdim=True).values, w.max(-1, keepdim=True).values
    if zero_point == "integer":  # the grid holds 0, so the zero point is a code (the reference's quantizer)
        lo, hi = lo.clamp_max(0), hi.clamp_min(0)
    return lo, hi


FP16_TINIEST = 2.0 ** -24  # the smallest positive float16: a step below it would be stored as 0


def _step(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> torch.Tensor:
    """The grid step over [lo, hi], at least FP16_TINIEST: a group of equal weights (a pruned neuron's zeros)
    keeps a positive stored scale, so its codes are finite (a float16 step of 0 would make them NaN)."""
    return ((hi - lo) / (2 ** bits - 1)).clamp_min(FP16_TINIEST)


def grid_log_range(w: torch.Tensor, bits: int, zero_point: str) -> torch.Tensor:
    """The log2 range of 8-bit scale codes for the groups of `w` (…, g): spanning their min-max steps."""
    return log8_encode(_step(*_range(w, zero_point), bits))[1]


# clip search (the GPTQ reference's Quantizer with mse=True, IST-DASLab/gptq quant.py): ranges shrunk by
# 1, 0.99, …, 0.21, keeping per group the one whose rounding error Σ|Ŵ − W|^2.4 is least
CLIP_STEPS, CLIP_NORM = 80, 2.4


def minmax_grid(w: torch.Tensor, bits: int, zero_point: str = "float16", log_range: torch.Tensor | None = None,
                clip: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The stored scale and the zero of an asymmetric b-bit grid spanning each row of `w` (…, g), shaped
    (…, 1); with `clip`, spanning the shrunk range that rounds the row best (CLIP_STEPS). The scale is
    float16, or with a `log_range` its uint8 log code (`grid_scale` gives the float16 value either way);
    the zero is the float16 minimum, or with zero_point="integer" the integer zero point (as float16).
    Rounded for storage before any code is chosen: codes are fitted to what dequantize reads."""
    lo, hi = _range(w, zero_point)
    best = None
    for i in range(CLIP_STEPS if clip else 1):
        shrink = 1 - i / 100
        low = lo * shrink
        step = _step(low, hi * shrink, bits)
        scale = fp16(step) if log_range is None else log8_encode(step, log_range)[0]
        s = grid_scale(scale, log_range)
        zero = fp16(low) if zero_point == "float16" else fp16((-low / s.float()).round().clamp(0, 2 ** bits - 1))
        if not clip:
            return scale, zero
        error = (grid_values(grid_codes(w, s, zero, bits, zero_point), s, zero, zero_point) - w).abs_() \
            .pow_(CLIP_NORM).sum(-1, keepdim=True)
        if best is None:
            best = [scale, zero, error]
        else:
            better = error < best[2]
            best = [torch.where(better, scale, best[0]), torch.where(better, zero, best[1]),
                    torch.where(better, error, best[2])]
    return best[0], best[1]


def grid_scale(scale: torch.Tensor, log_range: torch.Tensor | None) -> torch.Tensor:
    """The float16 scales decode reads from the stored ones (float16 already, or 8-bit log codes)."""
    return scale if log_range is None else fp16(log8_decode(scale, log_range))


def grid_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, zero_point: str) -> torch.Tensor:
    """Nearest codes of `w` on the grid (float16 scale and zero, broadcasting against w)."""
    s, z = scale.float(), zero.float()
    q = w / s + z if zero_point == "integer" else (w - z) / s
    return q.round().clamp(0, 2 ** bits - 1)


def grid_values(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, zero_point: str) -> torch.Tensor:
    """Ŵ from codes on the grid (float16 scale and zero, broadcasting)."""
    s, z = scale.float(), zero.float()
    return (codes - z) * s if zero_point == "integer" else codes * s + z


def grid_tensors(scale: torch.Tensor, zero: torch.Tensor, bits: int, zero_point: str,
                 log_range: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The stored tensors of a layer's grid from `minmax_grid`'s scale and zero (an integer zero point is
    packed at `bits` bits)."""
    out = {"scale": scale.reshape(-1),
           "zero": pack_bits(zero.reshape(-1), bits) if zero_point == "integer" else zero.reshape(-1)}
    if log_range is not None:
        out["log_range"] = log_range
    return out

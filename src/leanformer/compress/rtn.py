"""RTN: round-to-nearest, asymmetric min-max per group of `group_size` consecutive input weights.

Stored per layer: b-bit codes (packed), and per group a float16 scale and float16 minimum; with
col_scale, one float16 per input column too (Kashin's column scaling, offered to the baseline).
Honest size: bits + 32 / group_size bits per weight (+ 16 / out_features with col_scale).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .packing import fp16, pack_bits
from .quantization import AffineQuantConfig, check_group_size, col_scale_field, column_rms, group_size_field


@dataclass
class RTN(AffineQuantConfig):
    group_size: int | None = group_size_field(128)
    col_scale: bool = col_scale_field(False)

    method: ClassVar[str] = "rtn"
    SUPPORTED_BITS: ClassVar[tuple[int, ...]] = (2, 3, 4, 5, 6, 8)

    def quantize_weight(self, weight: torch.Tensor, name: str):
        out_f, in_f = weight.shape
        g = check_group_size(self.group_size, in_f, name)
        tensors = {}
        if self.col_scale:
            tensors["col_scale"] = column_rms(weight)
            weight = weight / tensors["col_scale"].float()
        w = weight.reshape(-1, g)
        scale, zero = minmax_grid(w, self.bits)
        codes = ((w - zero.float()) / scale.float()).round().clamp(0, 2 ** self.bits - 1)
        tensors.update(packed=pack_bits(codes, self.bits), scale=scale.reshape(-1), zero=zero.reshape(-1))
        return tensors, {"group_size": g, "col_scale": self.col_scale}


def minmax_grid(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The float16 scale and minimum of an asymmetric b-bit grid spanning each row of `w` (…, g), shaped
    (…, 1). Rounded to float16 before any code is chosen: codes are fitted to what dequantize will read."""
    lo, hi = w.min(-1, keepdim=True).values, w.max(-1, keepdim=True).values
    return fp16(((hi - lo) / (2 ** bits - 1)).clamp_min(1e-8)), fp16(lo)

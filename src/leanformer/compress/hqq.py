"""HQQ (Badri & Shaji 2023): half-quadratic optimisation of the per-group zero and scale, no
calibration data. The codes, scales and zeros come from the `hqq` package's own
`Quantizer.quantize` (optimize=True, its defaults: axis=1, zero rounded at 4 bits). hqq's own
HQQLinear does run on CPU (float32 compute, checked with hqq 0.2.8.post1), but it has its own
packing and serialisation; storing the codes in our QuantizedLinear makes packing, save/reload and
the size accounting identical for every method, so the comparison is like for like.

Stored per layer: b-bit codes (packed), per group a float16 scale and float16 zero; with col_scale,
one float16 per input column too (Kashin's column scaling, offered to the baseline: hqq optimises
the column-scaled weight). Honest size: bits + 32 / group_size bits per weight (+ 16 / out_features
with col_scale).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .packing import fp16, pack_bits
from .quantization import AffineQuantConfig, check_group_size, col_scale_field, column_rms, group_size_field


@dataclass
class HQQ(AffineQuantConfig):
    group_size: int | None = group_size_field(64)  # hqq's usual choice
    col_scale: bool = col_scale_field(False)

    method: ClassVar[str] = "hqq"
    SUPPORTED_BITS: ClassVar[tuple[int, ...]] = (1, 2, 3, 4, 5, 6, 8)
    ZERO_IN_CODES: ClassVar[bool] = True  # hqq's zero is a point in code units: Ŵ = s (q − zero)

    def quantize_weight(self, weight: torch.Tensor, name: str):
        from hqq.core.quantize import Quantizer

        out_f, in_f = weight.shape
        g = check_group_size(self.group_size, in_f, name)
        extra = {}
        if self.col_scale:
            extra["col_scale"] = column_rms(weight)
            weight = weight / extra["col_scale"].float()
        codes, meta = Quantizer.quantize(weight, nbits=self.bits, channel_wise=True, group_size=g,
                                         optimize=True, round_zero=self.bits == 4, axis=1,
                                         bitpack=False, device="cpu")
        scale, zero = fp16(meta["scale"].reshape(-1)), fp16(meta["zero"].reshape(-1))
        # hqq optimised codes against fp32 meta; re-round against the stored fp16 meta so the codes
        # are the best ones for what is actually stored (a no-op for almost every entry)
        w = weight.reshape(-1, g)
        codes = (w / scale.float()[:, None] + zero.float()[:, None]).round().clamp(0, 2 ** self.bits - 1)
        tensors = {"packed": pack_bits(codes, self.bits), "scale": scale, "zero": zero, **extra}
        return tensors, {"group_size": g, "col_scale": self.col_scale}

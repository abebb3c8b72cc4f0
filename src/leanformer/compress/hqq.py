"""HQQ (Badri & Shaji 2023): half-quadratic optimisation of the per-group zero and scale, no
calibration data. The codes, scales and zeros come from the `hqq` package's own
`Quantizer.quantize` (optimize=True, its defaults: axis=1, zero rounded at 4 bits). hqq's own
HQQLinear does run on CPU (float32 compute, checked with hqq 0.2.8.post1), but it has its own
packing and serialisation; storing the codes in our QuantizedLinear makes packing, save/reload and
the size accounting identical for every method, so the comparison is like for like.

Stored per layer: b-bit codes (packed), per group a float16 scale and float16 zero.
Honest size: bits + 32 / group_size bits per weight.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .packing import fp16, pack_bits, unpack_bits
from .quantization import QuantConfig, check_group_size, group_size_field


@dataclass
class HQQ(QuantConfig):
    group_size: int | None = group_size_field(64)  # hqq's usual choice

    method: ClassVar[str] = "hqq"
    SUPPORTED_BITS: ClassVar[tuple[int, ...]] = (1, 2, 3, 4, 5, 6, 8)

    def quantize_weight(self, weight: torch.Tensor, name: str):
        from hqq.core.quantize import Quantizer

        out_f, in_f = weight.shape
        g = check_group_size(self.group_size, in_f, name)
        codes, meta = Quantizer.quantize(weight, nbits=self.bits, channel_wise=True, group_size=g,
                                         optimize=True, round_zero=self.bits == 4, axis=1,
                                         bitpack=False, device="cpu")
        scale, zero = fp16(meta["scale"].reshape(-1)), fp16(meta["zero"].reshape(-1))
        # hqq optimised codes against fp32 meta; re-round against the stored fp16 meta so the codes
        # are the best ones for what is actually stored (a no-op for almost every entry)
        w = weight.reshape(-1, g)
        codes = (w / scale.float()[:, None] + zero.float()[:, None]).round().clamp(0, 2 ** self.bits - 1)
        tensors = {"packed": pack_bits(codes, self.bits), "scale": scale, "zero": zero}
        return tensors, {"group_size": g}

    @staticmethod
    def dequantize(tensors: dict[str, torch.Tensor], header: dict) -> torch.Tensor:
        out_f, in_f = header["shape"]
        g = header["group_size"]
        codes = unpack_bits(tensors["packed"], header["bits"], out_f * in_f).view(-1, g).float()
        w = (codes - tensors["zero"].float()[:, None]) * tensors["scale"].float()[:, None]
        return w.view(out_f, in_f)

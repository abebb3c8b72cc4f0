"""Kashin quantization with GPTQ's error compensation: Kashin's closed codebook (Merkulov et al., UAI 2024) as
the quantizer inside GPTQ's Algorithm 1 (Frantar et al., ICLR 2023).

GPTQ rounds one input column of W at a time and folds the column's error into the columns not yet rounded,
through the inverse Hessian of the layer's output error. That update holds whatever rounds the column, as long
as the column is rounded as a whole (Algorithm 1's update after a column reads only that column's error).
So here each column of W, all `out` weights one input reaches, is one Kashin vector, rounded by the closed
codebook (`kashin.closed_form`: `bits` greedy sign steps, each in the plain or the transformed domain, with
least-squares step sizes and sweeps re-picking the signs), and GPTQ compensates it.

Stored: a Kashin layer whose vectors are W's columns (header vectors="columns": the stored vectors are the
rows of Wᵀ); per column `bits` step sizes as 8-bit log codes in one range per layer, and `bits` domain bits;
the sign bits of each weight as its `bits`-bit code. Honest size: bits + (8 + 1) · bits / out per weight, plus
16 bytes per layer (the log range, two float32, and the transform's seed): at 2 bits 2.047 on MiniLM's 384-row
layers.

The forward (kashin.KashinForm) computes y = x Ŵᵀ = Σ_i x_i (a_i + P b_i) = x A + P (x B): P goes on the
output, once per token; the codes are read through per-column tables for a few tokens (lowbit.cpp
KashinLayer.columns), A and B decoded by blocks for more (columns_middle), and for many the weight is rebuilt.

Columns are rounded in act order (decreasing H_jj) by default; a column's vector does not depend on the order,
so nothing about the order is stored.
"""
from __future__ import annotations

import torch
from dataclasses import dataclass, field
from typing import ClassVar

from .gptq import HessianCalibration
from .kashin import TRANSFORMS, KashinForm, Transform, closed_form, log_coded, sign_codes, sign_vectors
from .packing import log8_decode, log8_encode, pack_bits
from ..errors import LeanformerError

# The step sizes' log range is set before the columns move (from a data-free rounding of the original columns) and
# widened by this many octaves on each side for the columns the compensation grows or shrinks; the relative
# precision of a step stays within (range + 1) / 508 octaves, about 1 % for a 6-octave spread.
RANGE_MARGIN_OCTAVES = 0.5


@dataclass
class KashinGPTQ(HessianCalibration, KashinForm):
    transform: str = field(default="dct", metadata={
        "help": "orthogonal transform P on each column: dct (sign-randomised DCT, O(N log N)) or random",
        "choices": TRANSFORMS})
    sweeps: int = field(default=4, metadata={"help": "refinement rounds over each column's sign vectors"})
    seed: int = field(default=0, metadata={"help": "seed of the transform's random signs / matrix"})

    method: ClassVar[str] = "kashin-gptq"
    SUPPORTED_BITS: ClassVar[tuple[int, ...]] = (2, 3, 4)  # the codes' tables (lowbit.cpp) hold at most 16 values

    def __post_init__(self):
        super().__post_init__()
        if self.transform not in TRANSFORMS:
            raise LeanformerError(f"KashinGPTQ: unknown transform {self.transform!r}; choose from "
                                  f"{', '.join(TRANSFORMS)}")
        if not isinstance(self.sweeps, int) or self.sweeps < 0:
            raise LeanformerError(f"KashinGPTQ: sweeps must be a non-negative integer, got {self.sweeps!r}")

    def _round(self, columns: torch.Tensor, P: Transform, log_range: torch.Tensor):
        """Closed-codebook rounding of (n, out) columns: (their rounded values, codes, domains, step codes), the
        step sizes as log codes in log_range."""
        signs, doms, coef = closed_form(columns, P, self.bits, self.sweeps)
        signs, steps, _ = log_coded(signs, coef, log_range)
        rounded = torch.einsum("kvn,vk->vn", sign_vectors(signs, doms, P), log8_decode(steps, log_range))
        return rounded, sign_codes(signs), doms.T, steps

    def quantize_weight(self, weight: torch.Tensor, name: str, gram: torch.Tensor):
        out_f, in_f = weight.shape
        P = Transform(self.transform, out_f, self.seed)
        first_steps = closed_form(weight.float().T.contiguous(), P, self.bits, self.sweeps)[2]
        log_range = log8_encode(first_steps.abs())[1] + torch.tensor([-RANGE_MARGIN_OCTAVES, RANGE_MARGIN_OCTAVES])
        codes = torch.empty(in_f, out_f, dtype=torch.long)
        domains = torch.empty(in_f, self.bits, dtype=torch.long)
        steps = torch.empty(in_f, self.bits, dtype=torch.uint8)

        def round_column(j: int, col: int, work: torch.Tensor) -> torch.Tensor:
            rounded, codes[col], domains[col], steps[col] = self._round(work[:, j][None], P, log_range)
            return rounded[0]

        self.compensated_rounding(weight, gram, name, round_column)
        tensors = {"packed": pack_bits(codes, self.bits), "steps": steps, "log_range": log_range,
                   "domains": pack_bits(domains, 1), "seed": torch.tensor([self.seed], dtype=torch.int64)}
        header = {"form": "vector", "codebook": "closed", "transform": self.transform, "group_size": out_f,
                  "vectors": "columns", "col_scale": False, "step_sizes": "vector", "scale_bits": 8}
        return tensors, header

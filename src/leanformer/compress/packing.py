"""Bit packing of b-bit codes (little-endian within each byte, no per-row padding) and the float16
rounding of stored metadata: the stored bytes are exactly what the size accounting counts.

Eight b-bit codes fill exactly b bytes, so packing and unpacking work on runs of b bytes read as one
little-endian word (vectorised shifts over n/8 words, no per-bit tensors). In memory a layer keeps its
codes as `runtime_codes`: two per byte for b ≤ 4 (nibbles), one per byte above, so rebuilding the weight
on each forward costs one or two byte operations per weight instead of unpacking a bit stream.
"""
from __future__ import annotations

import torch

from ..errors import LeanformerError


def packed_nbytes(n: int, bits: int) -> int:
    return (n * bits + 7) // 8


def _word_dtype(bits: int) -> torch.dtype:
    return torch.int32 if bits <= 3 else torch.int64  # 8 codes = 8·bits bits must fit the (signed) word


def pack_bits(idx: torch.Tensor, bits: int) -> torch.Tensor:
    """Flat uint8 tensor of ceil(n*bits/8) bytes holding the n indices (each < 2**bits)."""
    idx = idx.reshape(-1)
    if bits == 8:
        return idx.to(torch.uint8)
    n = idx.numel()
    pad = (-n) % 8
    codes = torch.cat([idx.to(torch.int64), idx.new_zeros(pad, dtype=torch.int64)]) if pad else idx.to(torch.int64)
    shifts = torch.arange(8, dtype=torch.int64, device=idx.device) * bits
    words = (codes.view(-1, 8) << shifts).sum(1)                         # 8 codes → one 8·bits-bit word
    byte_shifts = torch.arange(bits, dtype=torch.int64, device=idx.device) * 8
    out = ((words[:, None] >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)
    return out[: packed_nbytes(n, bits)]


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of pack_bits: uint8 tensor of the first n codes."""
    if packed.numel() != packed_nbytes(n, bits):
        raise LeanformerError(f"packed index stream holds {packed.numel()} bytes but {n} indices of "
                              f"{bits} bits need {packed_nbytes(n, bits)}")
    if bits == 8:
        return packed.clone()
    pad = (-packed.numel()) % bits
    if pad:
        packed = torch.cat([packed, packed.new_zeros(pad)])
    dtype = _word_dtype(bits)
    runs = packed.view(-1, bits).to(dtype)
    word = runs[:, 0].clone()
    for k in range(1, bits):
        word |= runs[:, k] << (8 * k)
    shifts = torch.arange(8, dtype=dtype, device=packed.device) * bits
    return ((word[:, None] >> shifts) & ((1 << bits) - 1)).to(torch.uint8).reshape(-1)[:n]


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of pack_bits: int64 tensor of the first n indices."""
    return unpack_codes(packed, bits, n).to(torch.int64)


def runtime_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """The in-memory layout of a layer's codes: two per byte (low nibble first) for bits ≤ 4, else one."""
    codes = codes.reshape(-1).to(torch.uint8)
    if bits > 4:
        return codes
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_zeros(1)])
    pairs = codes.view(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def runtime_nbytes(n: int, bits: int) -> int:
    return (n + 1) // 2 if bits <= 4 else n


def codes_from_runtime(runtime: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """uint8 codes (n) from `runtime_codes`' layout."""
    if bits > 4:
        return runtime
    return torch.stack((runtime & 0xF, runtime >> 4), -1).view(-1)[:n]


def fp16(t: torch.Tensor) -> torch.Tensor:
    """Metadata is stored in float16; methods compute with the rounded value so reload is exact."""
    return t.to(torch.float16)


SCALE_BITS = (16, 8)  # how per-group (or per-vector) scales are stored: float16, or 8-bit log codes (log8_encode)
LOG8_OCTAVES = 16  # log8 codes span at most this many octaves below the largest value; smaller ones store 0


def log8_encode(values: torch.Tensor, log_range: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-negative values → uint8 codes: 0 is exactly zero, 1…255 are evenly spaced in log2 between
    the smallest and the largest value (floored at LOG8_OCTAVES below the largest), plus that range
    [lo, hi] of log2 as float32. Relative precision: half a code step, (hi − lo)/508 octaves. With a
    `log_range` given (one fixed before all the values are known), values outside it take its end codes
    and only exact zeros store 0."""
    if log_range is None:
        hi = values.max().clamp_min(1e-30).log2()
        keep = values >= torch.exp2(hi - LOG8_OCTAVES)
        lo = values[keep].log2().min() if keep.any() else hi
        log_range = torch.stack([lo, hi]).float()
    else:
        keep = values > 0
    lo, hi = log_range
    step = (hi - lo) / 254
    q = 1 + ((values.clamp_min(1e-30).log2() - lo) / step.clamp_min(1e-12)).round().clamp(0, 254)
    return torch.where(keep, q, 0).to(torch.uint8), log_range


def log8_decode(codes: torch.Tensor, log_range: torch.Tensor) -> torch.Tensor:
    lo, hi = log_range.float()
    values = torch.exp2(lo + (codes.float() - 1) * ((hi - lo) / 254))
    return torch.where(codes > 0, values, 0.0)

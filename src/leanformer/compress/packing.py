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

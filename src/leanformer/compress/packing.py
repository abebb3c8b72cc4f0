"""Bit packing of b-bit codes (little-endian within each byte, no per-row padding) and the float16
rounding of stored metadata: the stored bytes are exactly what the size accounting counts."""
from __future__ import annotations

import torch

from ..errors import LeanformerError


def packed_nbytes(n: int, bits: int) -> int:
    return (n * bits + 7) // 8


def pack_bits(idx: torch.Tensor, bits: int) -> torch.Tensor:
    """Flat uint8 tensor of ceil(n*bits/8) bytes holding the n indices (each < 2**bits)."""
    idx = idx.reshape(-1).to(torch.int64)
    if bits == 8:
        return idx.to(torch.uint8)
    shifts = torch.arange(bits, dtype=torch.int64, device=idx.device)
    bitstream = ((idx[:, None] >> shifts) & 1).reshape(-1)
    pad = (-bitstream.numel()) % 8
    if pad:
        bitstream = torch.cat([bitstream, bitstream.new_zeros(pad)])
    return (bitstream.view(-1, 8) << torch.arange(8, dtype=torch.int64, device=idx.device)).sum(1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of pack_bits: int64 tensor of the first n indices."""
    if packed.numel() != packed_nbytes(n, bits):
        raise LeanformerError(f"packed index stream holds {packed.numel()} bytes but {n} indices of "
                              f"{bits} bits need {packed_nbytes(n, bits)}")
    if bits == 8:
        return packed.to(torch.int64)
    dev = packed.device
    bitstream = ((packed.to(torch.int64)[:, None] >> torch.arange(8, dtype=torch.int64, device=dev)) & 1).reshape(-1)
    bitstream = bitstream[: n * bits].view(n, bits)
    return (bitstream << torch.arange(bits, dtype=torch.int64, device=dev)).sum(1)


def fp16(t: torch.Tensor) -> torch.Tensor:
    """Metadata is stored in float16; methods compute with the rounded value so reload is exact."""
    return t.to(torch.float16)

"""Streaming accumulators: every metric of `inspect` from running sums, so memory is O(L·d²)
whatever the number of tokens.

Per layer i: Σh, Σhᵀh; per transition: the block's own output r = h_{i+1} − h_i through Σh_iᵀr,
Σr and Σ‖r‖² (so the without-residual score never subtracts two nearly equal moment matrices:
adjacent states are often ≥0.9999 alike). Products are accumulated in float64 from float32 batch products of shifted states
(h − shift, the shift being the first batch's mean): centred moments are unchanged by a shift, and
removing the bulk of the mean first avoids the cancellation that large-mean ("massive activation")
dimensions would otherwise cause in Gram − n·μμᵀ, without paying for float64 matrix products. Also per transition: Σcos and the last-token angular sum. Linearity (with and without residual), anisotropy and block influence follow exactly from
these. Intrinsic dimension needs points: the states of a fixed seeded sample of token positions
(`sample_positions`), the same positions for every layer, whatever order the batches come in.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .spectrum import anisotropy_from_covariance
from .linear_fit import linearity_from_moments
from .twonn import intrinsic_dimension


def sample_positions(n_tokens: int, k: int, seed: int = 0) -> np.ndarray:
    """Sorted global token positions kept for intrinsic dimension: a seeded uniform sample of
    min(k, n_tokens), fixed before the pass so it does not depend on batch order or padding."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_tokens, size=min(k, n_tokens), replace=False))


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


class GeometryAccumulator:
    def __init__(self, sample: np.ndarray):
        """sample: sorted global token positions whose states are kept (see sample_positions)."""
        self.n_tokens = 0
        self.n_sequences = 0
        self.sample = np.asarray(sample)
        self._points: list[torch.Tensor] | None = None
        self._sum: list[torch.Tensor] = []
        self._gram: list[torch.Tensor] = []
        self._cross: list[torch.Tensor] = []  # Σ h_iᵀ r_i
        self._rsum: list[torch.Tensor] = []
        self._rsq: list[float] = []
        self._cos_sum: list[float] = []
        self._angle_sum: list[float] = []
        self._sparse: list[list[float]] | None = None

    def update(self, states: list[torch.Tensor], positions: np.ndarray, last_token: torch.Tensor,
               mlp_near_zero: list[tuple[int, int]] | None = None) -> None:
        """states: h_0…h_L, each (n_valid_tokens, d); positions: each row's global token position;
        last_token: row indices of each sequence's last valid token; mlp_near_zero: per block
        (near-zero activations, all activations) or None."""
        if not self._sum:
            self._shift = [s.mean(dim=0).float() for s in states]
        h = [s.float() - m for s, m in zip(states, self._shift)]
        if not self._sum:
            d = h[0].shape[1]
            self._sum = [torch.zeros(d, dtype=torch.float64, device=h[0].device) for _ in h]
            self._gram = [torch.zeros(d, d, dtype=torch.float64, device=h[0].device) for _ in h]
            self._cross = [torch.zeros(d, d, dtype=torch.float64, device=h[0].device) for _ in h[1:]]
            self._rsum = [torch.zeros(d, dtype=torch.float64, device=h[0].device) for _ in h[1:]]
            self._rsq = [0.0] * (len(h) - 1)
            self._cos_sum = [0.0] * (len(h) - 1)
            self._angle_sum = [0.0] * (len(h) - 1)
        for i, x in enumerate(h):
            self._sum[i] += x.sum(dim=0, dtype=torch.float64)
            self._gram[i] += (x.T @ x).double()
        for i in range(len(h) - 1):
            r = h[i + 1] - h[i]
            self._cross[i] += (h[i].T @ r).double()
            self._rsum[i] += r.sum(dim=0, dtype=torch.float64)
            self._rsq[i] += float(r.double().pow(2).sum())
            cos = torch.nn.functional.cosine_similarity(states[i], states[i + 1], dim=1).double()
            self._cos_sum[i] += float(cos.sum())
            last = cos[last_token].clamp(-1, 1)
            self._angle_sum[i] += float((torch.arccos(last) / torch.pi).sum())
        if mlp_near_zero is not None:
            if self._sparse is None:
                self._sparse = [[0, 0] for _ in mlp_near_zero]
            for acc, (zeros, count) in zip(self._sparse, mlp_near_zero):
                acc[0] += zeros
                acc[1] += count
        self._keep_sampled(states, np.asarray(positions))
        self.n_tokens += h[0].shape[0]
        self.n_sequences += len(last_token)

    def _keep_sampled(self, states: list[torch.Tensor], positions: np.ndarray) -> None:
        if self._points is None:
            self._points = [torch.zeros(len(self.sample), s.shape[1]) for s in states]
        slots = np.searchsorted(self.sample, positions).clip(max=max(len(self.sample) - 1, 0))
        hit = np.nonzero(self.sample[slots] == positions)[0] if len(self.sample) else np.array([], dtype=int)
        rows, slots = torch.from_numpy(hit), torch.from_numpy(slots[hit])
        for buf, s in zip(self._points, states):
            buf[slots] = s[rows].detach().float().cpu()

    def _centred(self, i: int) -> torch.Tensor:
        mu = self._sum[i] / self.n_tokens
        return self._gram[i] - self.n_tokens * torch.outer(mu, mu)

    def _centred_cross(self, i: int) -> torch.Tensor:
        """Centred Σ h_iᵀ r_i."""
        return self._cross[i] - self.n_tokens * torch.outer(self._sum[i] / self.n_tokens, self._rsum[i] / self.n_tokens)

    def layer_metrics(self, twonn_keep: float = 0.9) -> list[dict]:
        sample = self._points or []
        out = []
        for i in range(len(self._sum)):
            sparsity = None
            if self._sparse is not None and 1 <= i <= len(self._sparse):
                zeros, count = self._sparse[i - 1]  # layer i is the output of block i-1
                sparsity = zeros / count if count else None
            out.append({"index": i, "anisotropy": anisotropy_from_covariance(self._centred(i)),
                        # None when too few distinct points remain (e.g. a decoder's h_0 repeats
                        # each token's embedding, and TwoNN drops duplicated points).
                        "intrinsic_dim": _finite_or_none(intrinsic_dimension(sample[i], keep=twonn_keep)),
                        "mlp_sparsity": sparsity})
        return out

    def transition_metrics(self) -> list[dict]:
        out = []
        for i in range(len(self._cross)):
            Cxx, Cyy = self._centred(i), self._centred(i + 1)
            Crx = self._centred_cross(i)
            Cxy = Cxx + Crx  # Y = X + R
            mu_r = self._rsum[i] / self.n_tokens
            Crr_trace = self._rsq[i] - self.n_tokens * float(mu_r @ mu_r)
            out.append({"from": i, "to": i + 1,
                        "linearity": linearity_from_moments(Cxx, Cxy, float(torch.trace(Cyy))),
                        "linearity_wo_residual": linearity_from_moments(Cxx, Crx, float(Crr_trace)),
                        "block_influence": 1.0 - self._cos_sum[i] / self.n_tokens,
                        "angular_distance": self._angle_sum[i] / max(self.n_sequences, 1)})
        return out

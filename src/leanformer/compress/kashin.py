"""Kashin quantization (Merkulov et al., "Quantization of Large Language Models with an Overdetermined Basis", UAI 2024).

Each weight vector x (a row of W, a group of `group_size` consecutive entries of a row, or
`rows_per_vector` consecutive whole rows) is written through a Kashin representation x ≈ u + P v,
P orthogonal, u and v of small ∞-norm. The greedy that builds it adds one scaled sign vector per
step, in the plain domain (Δu = sign(ρ)‖ρ‖₁/N) or the transformed one (Δv = sign(Pᵀρ)‖Pᵀρ‖₁/N), so
its factors concentrate on a few values.

P is the fast structured transform P z = IDCT(ε ⊙ DCT(z)) (sign-randomised DCT, O(N log N) for any
N, ε from a seed; transform="random" uses a dense random orthogonal P, O(N²)).

Two ways to quantize the factors (`codebook`):
- "closed" (default; the structured follow-up): keep `bits` greedy steps per vector, each one sign
  bit per weight in whichever domain (plain or P) removes more of the residual, with the step sizes
  refit jointly by least squares (the closed-form centroids: u takes the values ±c1 ±c2 …) and a
  few sweeps that re-pick each sign vector given the others. Stored: one `bits`-bit index per weight
  (its sign bits), per vector `bits` step sizes and `bits` domain bits, the seed; with
  step_sizes="shared", one float16 set of step sizes per layer and one scale per vector instead.
  The per-vector numbers are float16, or with scale_bits=8 one byte each, log-coded between the
  layer's smallest and largest (rounded to within (hi − lo)/508 octaves: at most 0.8 % for a 6-octave
  spread, far below the quantization error at 2–4 bits).
- "kmeans" (the reference): run the greedy to `tol`, then quantize the pairs (u_i, v_i) jointly with
  a k-means codebook of 2^bits points (float16) shared by the layer, plus a float16 scale per
  vector refit by least squares. form="matrix" is the reference's matrix form X ≈ U + Q1 V Q2ᵀ
  (Q1, Q2 sign-randomised DCT or random orthogonal, whole-layer, float32 norm), for comparison.

In the vector form the input columns are first divided by their RMS (`col_scale`, one float16 per
input column, stored): the decomposition spreads error evenly along a row, and this keeps columns
of small weights (often the ones reading outlier activation features) from losing all precision.

Short rows (narrow layers: stories260K's are 64 and 172 wide) make the per-vector metadata a large
share of the bits: `bits` float16 step sizes on a 64-weight row cost 0.75 bits per weight at 3 bits.
Three ways to pay less, each counted in the stored bytes: longer vectors (`rows_per_vector`), shared
step sizes, 8-bit step sizes (`scale_bits`). layout="auto" picks among them per layer (rule in
`Kashin._auto`); a saved header holds the chosen layout (its `group_size` is the vector length,
which is a multiple of the width for whole-row vectors), so dequantize needs nothing else.

Both check that the layer's Kashin decomposition converges (alternating greedy to `tol` within
`max_iter` steps); a layer that does not raises NotConverged and stays in full precision.
"""
from __future__ import annotations

import functools
import math
import weakref
from dataclasses import dataclass, field
from functools import lru_cache
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..errors import LeanformerError
from .kmeans import kmeans
from .packing import SCALE_BITS, fp16, log8_decode, log8_encode, pack_bits, unpack_bits
from .quantization import (NotConverged, QuantConfig, check_group_size, col_scale_field, column_rms,
                           group_size_field, nearest_divisors, scale_bits_field)

TRANSFORMS = ("dct", "random")
FORMS = ("vector", "matrix")


# --------------------------------------------------------------------------------------------
# Orthonormal DCT-II / DCT-III along the last dimension via one real FFT (Makhoul, "A fast cosine
# transform in one and two dimensions", IEEE TASSP 1980, eqs. 19-22 and 38): reorder x into
# v = (x_0, x_2, x_4, …, x_5, x_3, x_1), then DCT_k = scale_k Re(e^{−iπk/2N} V_k), V = FFT(v). v is
# real, so V_{N−k} = conj(V_k) and the half spectrum of rfft gives every coefficient.

# Kashin.linear puts P on the activations up to ACTIVATION_ROUTE_TOKENS tokens (× rows per vector), and rebuilds the
# weight above: P on the weight costs one transform per vector per call, whatever the tokens. On the activations the
# native kernels take one of two routes: up to TABLE_KERNEL_TOKENS the codes are read through per-vector tables once
# per token (no weight-sized pass at all); above, A and B are decoded a block of rows at a time and multiplied with
# x_c and u = Pᵀ x_c in one matmul (the "middle" route; torch's twin is _linear_on_activations). One thread, 3 bits
# (benchmarks/route_crossover.py at db77b66), on the seven row shapes of MiniLM (384-1536 wide) and stories260K
# (64-172): the table route is the faster, or ties, up to 12 tokens, and the middle route overtakes it between 12 and
# 32; at 32 tokens the middle route still beats the weight route on every shape, at 64 the weight route wins on every
# one (the threshold stays at 24: Kashin.linear's torch routes read it too, and they were not measured here).
ACTIVATION_ROUTE_TOKENS = 24
TABLE_KERNEL_TOKENS = 12
# Layers of column vectors (KashinGPTQ): the table route up to COLUMN_TABLE_TOKENS, the middle route up to
# COLUMN_MIDDLE_TOKENS, then the weight route. One thread, 3 bits (route_crossover at db77b66): at 8 tokens the two
# tie on MiniLM's 1536-wide shapes and stories260K's 64 x 172 (the table route ahead elsewhere); at 12 the middle
# route is 5-19 % faster on all three of MiniLM's shapes. The weight route ties with the middle one between 32 and 64
# tokens (at 64: 0.8-1.05x the middle route's time on MiniLM, 0.9-1.2x on stories260K).
COLUMN_TABLE_TOKENS = 8
COLUMN_MIDDLE_TOKENS = 48
# layouts without the middle route (vectors spanning rows, more than 4 bits, odd lengths) keep the table route up to
# where the weight route caught up with it before there was a middle one (12-24 tokens, route_crossover at 4f54491)
TABLE_ONLY_TOKENS = 12
REBUILD_CHUNK = 2 ** 16  # weights rebuilt per step of the weight route (256 KiB of float32)
DENSE_TRANSFORM_MAX = 256  # vectors up to this length apply P as one dense (cached) matrix product:
                           # g² multiply-adds per vector beat the FFT's passes over memory at this size
# The activation route (a few tokens) applies P to the input alone, where torch's FFT costs more in per-call
# overhead than in arithmetic; one matrix per length serves every layer (quantize_weight), so it stays in cache.
# One token, one thread, an n x n layer: dense / FFT 34 / 68 us at 384, 58 / 91 at 512, 164 / 150 at 768.
ACTIVATION_DENSE_MAX = 512
# The table routes apply the "dct" P to one token at a time by its even/odd split (`_butterfly`) while its length is
# even and at least this: each level costs (n/2)² multiply-adds where the dense matrix costs n².
BUTTERFLY_MIN = 32


@lru_cache(maxsize=64)
def _even_odd_order(n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Makhoul's reordering (evens, then odds reversed) as an index, and its inverse."""
    order = torch.cat([torch.arange(0, n, 2), torch.arange(1, n, 2).flip(0)])
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(n)
    return order.to(device), inverse.to(device)


@lru_cache(maxsize=64)
def _twiddle(n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """e^{−iπk/2N} for the half spectrum k = 0…N/2, and the orthonormal scale of each DCT coefficient."""
    k = torch.arange(n // 2 + 1, dtype=torch.float64) * math.pi / (2 * n)
    scale = torch.full((n,), math.sqrt(2.0 / n), dtype=torch.float64)
    scale[0] = math.sqrt(1.0 / n)
    return torch.polar(torch.ones_like(k), -k).to(torch.complex64).to(device), scale.float().to(device)


def dct(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[-1]
    order, _ = _even_odd_order(n, x.device)
    w, scale = _twiddle(n, x.device)
    z = torch.fft.rfft(x.index_select(-1, order)) * w
    # DCT_{N−k} = Re(e^{−iπ(N−k)/2N} conj(V_k)) = −Im(e^{−iπk/2N} V_k) for 0 < k < N/2
    return torch.cat([z.real, -z.imag[..., 1:(n + 1) // 2].flip(-1)], dim=-1) * scale


def idct(y: torch.Tensor) -> torch.Tensor:
    n = y.shape[-1]
    half = n // 2 + 1
    _, inverse = _even_odd_order(n, y.device)
    w, scale = _twiddle(n, y.device)
    yk = y / scale
    # the inverse of dct: V_k = e^{iπk/2N} (Y_k − i Y_{N−k}) for k = 0…N/2 (Y_N := 0)
    yrev = torch.cat([torch.zeros_like(yk[..., :1]), yk[..., n - half + 1:].flip(-1)], dim=-1)
    v = torch.fft.irfft(torch.complex(yk[..., :half], -yrev) * w.conj(), n=n)
    return v.index_select(-1, inverse)


@lru_cache(maxsize=256)  # dequantize builds P on every forward; the signs are read-only
def _signs(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=g).float() * 2 - 1


@lru_cache(maxsize=256)
def _spectral_signs(n: int, seed: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """P = IDCT·diag(ε)·DCT on the half spectrum: with V = rfft(v) of the reordered input, the reordered
    output is irfft(H), H_k = α_k V_k + β_k e^{iπk/N} conj(V_k), α_k = (ε_k + ε_{N−k})/2,
    β_k = (ε_k − ε_{N−k})/2 (dct's DCT_k and DCT_{N−k} both come from V_k; the twiddles of dct and
    idct cancel, and so do the scales). One of α_k, β_k is 0, so H_k = c_k · (V_k or conj(V_k)):
    returns the (N/2+1, 2) real factors that conjugate (1, ±1) and the complex c_k."""
    eps = _signs(n, seed).double()
    half = n // 2 + 1
    eps_mirror = torch.cat([eps[:1], eps[1:].flip(0)])[:half]  # ε_{N−k}; at k = 0 V_0 is real, any sign works
    alpha, beta = (eps[:half] + eps_mirror) / 2, (eps[:half] - eps_mirror) / 2
    k = torch.arange(half, dtype=torch.float64)
    coef = torch.where(beta != 0, beta * torch.polar(torch.ones_like(k), k * math.pi / n), alpha.to(torch.complex128))
    conjugate = torch.stack([torch.ones_like(beta), torch.where(beta != 0, -1.0, 1.0)], -1)
    return conjugate.float().to(device), coef.to(torch.complex64).to(device)


@lru_cache(maxsize=256)
def _spectral_matrix(n: int, seed: int) -> torch.Tensor:
    """The same step as one real 2 × 2 map per bin, (bins, 4) = (m00, m01, m10, m11): with s the sign on Im V_k
    and c_k = a + ib, H_k = (a Re V − s b Im V) + i (b Re V + s a Im V) (for lowbit.cpp spectral_map)."""
    conjugate, coef = _spectral_signs(n, seed, torch.device("cpu"))
    s, a, b = conjugate[:, 1], coef.real, coef.imag
    return torch.stack([a, -s * b, b, s * a], -1).contiguous()


@lru_cache(maxsize=16)
def _random_orthogonal(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()  # sign fix: a unique, Haar-distributed Q


@lru_cache(maxsize=16)
def _dct_matrix(n: int, seed: int) -> torch.Tensor:
    """Dense form of P = IDCT·diag(ε)·DCT (used by the matrix form)."""
    return idct(_signs(n, seed) * dct(torch.eye(n))).T.contiguous()  # column j = P e_j


@lru_cache(maxsize=64)
def _dense_on(kind: str, n: int, seed: int, device: torch.device, transpose: bool = False) -> torch.Tensor:
    m = _matrix(kind, n, seed).to(device)
    return (m.T if transpose else m).contiguous()  # (the random P's QR factor is column-major)


@lru_cache(maxsize=64)
def _butterfly(n: int, seed: int, device: torch.device) -> torch.Tensor | None:
    """The "dct" P = IDCT·diag(ε)·DCT by its even/odd split, for lowbit.cpp's PMap. The DCT's rows of even index
    are (up to 1/√2) the half-length DCT of s = z_top + J z_bottom (J: the reversal) and its odd ones read
    d = z_top − J z_bottom only, so P z = [E s + O d ; J (E s − O d)] with E = (P₁₁ + P₁₂ J)/2, half the same kind
    of map on n/2 (with the signs ε of even index), and O = (P₁₁ − P₁₂ J)/2. Returns O of each level, then the
    last level's dense map, flattened (float32); None if n does not split."""
    if n % 2 or n < BUTTERFLY_MIN:
        return None
    blocks, m = [], _matrix("dct", n, seed).double()
    while m.shape[0] % 2 == 0 and m.shape[0] >= BUTTERFLY_MIN:
        h = m.shape[0] // 2
        top_right = m[:h, h:].flip(1)  # P₁₂ J
        blocks.append((m[:h, :h] - top_right) / 2)
        m = (m[:h, :h] + top_right) / 2
    return torch.cat([b.reshape(-1) for b in (*blocks, m)]).float().to(device)


class Transform:
    """The orthogonal P along the last dimension: apply(z) = P z, applyT(z) = Pᵀ z.

    For "dct", P is symmetric and an involution (Pᵀ = P) and costs one rfft, one elementwise pass and
    one irfft per vector, plus Makhoul's reordering on the way in and out; `apply_reordered` skips the
    reordering, for callers that can keep their data in that order (the reordering is `order`)."""

    def __init__(self, kind: str, n: int, seed: int):
        self.kind, self.n, self.seed = kind, n, seed
        if kind == "dct":
            self.eps = _signs(n, seed)
        else:
            self.q = _random_orthogonal(n, seed)

    def apply(self, z):
        if self.kind != "dct":
            return z @ self.q.to(z.device).T
        order, inverse = _even_odd_order(self.n, z.device)
        return self.apply_reordered(z.index_select(-1, order)).index_select(-1, inverse)

    def applyT(self, z):
        return self.apply(z) if self.kind == "dct" else z @ self.q.to(z.device)

    def order(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """("dct") The reordering apply_reordered works in, and its inverse: (P z)[order] = apply_reordered(z[order])."""
        return _even_odd_order(self.n, device)

    def apply_reordered(self, v: torch.Tensor, out: torch.Tensor | None = None, spectral_map=None) -> torch.Tensor:
        """("dct") P in Makhoul's order: v = z[order] ↦ (P z)[order] (written into `out` when given).
        spectral_map(spectrum, matrix): the fused kernel (lowbit.cpp) for the step between the FFTs."""
        spectrum = torch.fft.rfft(v)
        if spectral_map is not None:
            spectral_map(spectrum, _spectral_matrix(self.n, self.seed))
        else:
            conjugate, coef = _spectral_signs(self.n, self.seed, v.device)
            torch.view_as_real(spectrum).mul_(conjugate)  # in place: no more weight-sized buffers than needed
            spectrum.mul_(coef)
        return torch.fft.irfft(spectrum, n=self.n, out=out)

    def matrix(self, device: torch.device, transpose: bool = False) -> torch.Tensor:
        """P as a dense (n, n) matrix M (P z = M z; rows z: z @ Mᵀ), or Mᵀ contiguous, cached per (kind, n, seed,
        device): every layer of one vector length reads the same matrix, which then stays in cache."""
        return _dense_on(self.kind, self.n, self.seed, device, transpose)

    def butterfly(self, device: torch.device) -> torch.Tensor | None:
        """("dct") P by its even/odd split for the kernels' table routes (`_butterfly`), cached; None otherwise."""
        return _butterfly(self.n, self.seed, device) if self.kind == "dct" else None

    @property
    def dense(self) -> bool:
        """Whether the forward applies P as a dense matrix (short vectors, or a random P, which is dense anyway)."""
        return self.kind != "dct" or self.n <= DENSE_TRANSFORM_MAX

    def rows(self, z: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        """P (or Pᵀ) applied to each vector along the last dimension, by the faster of the dense and FFT forms."""
        if self.dense:
            m = self.matrix(z.device)
            return z @ (m if transpose else m.T)
        return self.apply(z)  # dct: Pᵀ = P


def _matrix(kind: str, n: int, seed: int) -> torch.Tensor:
    return _dct_matrix(n, seed) if kind == "dct" else _random_orthogonal(n, seed)


# --------------------------------------------------------------------------------------------
# Decompositions


def kashin_vectors(x: torch.Tensor, P: Transform, tol: float, max_iter: int):
    """Alternating greedy Kashin decomposition of each row of x: x ≈ u + P v.

    Returns (u, v, relative residual per row, iterations used).
    """
    u = torch.zeros_like(x)
    v = torch.zeros_like(x)
    rho = x.clone()
    xnorm = x.norm(dim=-1).clamp_min(1e-30)
    n = x.shape[-1]
    it = 0
    for it in range(1, max_iter + 1):
        du = torch.sign(rho) * rho.abs().sum(-1, keepdim=True) / n
        u += du
        rho -= du
        z = P.applyT(rho)
        dv = torch.sign(z) * z.abs().sum(-1, keepdim=True) / n
        v += dv
        rho -= P.apply(dv)
        rel = rho.norm(dim=-1) / xnorm
        if rel.max() < tol:
            break
    return u, v, rel, it


def kashin_matrix(x: torch.Tensor, q1: torch.Tensor, q2: torch.Tensor, tol: float, max_iter: int):
    """Greedy Kashin decomposition of a matrix: x ≈ U + Q1 V Q2ᵀ (reference matrix form)."""
    U = torch.zeros_like(x)
    V = torch.zeros_like(x)
    R = x.clone()
    xnorm = x.norm().clamp_min(1e-30)
    n = x.numel()
    rel = torch.tensor(1.0)
    it = 0
    for it in range(1, max_iter + 1):
        Y = q1.T @ R @ q2
        gain_u, gain_v = R.abs().sum(), Y.abs().sum()  # ⟨sign(·), ·⟩ = the decrease each step buys
        if gain_u >= gain_v:
            d = torch.sign(R) * gain_u / n
            U += d
            R -= d
        else:
            d = torch.sign(Y) * gain_v / n
            V += d
            R -= q1 @ d @ q2.T
        rel = R.norm() / xnorm
        if rel < tol:
            break
    return U, V, rel, it


# --------------------------------------------------------------------------------------------
# The closed codebook: greedy sign steps with least-squares step sizes


CODEBOOKS = ("closed", "kmeans")
STEP_SIZES = ("vector", "shared")


def _sign(z: torch.Tensor) -> torch.Tensor:
    return torch.where(z >= 0, 1.0, -1.0)


def _lstsq_steps(cols: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Step sizes c (rows, k) minimising ‖x − Σ_j c_j col_j‖ per row (k×k normal equations)."""
    S = torch.stack(cols, -1)
    G = S.transpose(1, 2) @ S
    G = G + 1e-6 * torch.diagonal(G, dim1=1, dim2=2).mean(-1)[:, None, None] * torch.eye(len(cols))
    return torch.linalg.solve(G, S.transpose(1, 2) @ x.unsqueeze(-1)).squeeze(-1)


def _lstsq_shared(cols: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """One set of k step sizes for all rows (least squares over the whole layer), broadcast to rows."""
    S = torch.stack(cols, -1)
    G = torch.einsum("rnk,rnj->kj", S, S)
    G = G + 1e-6 * torch.diagonal(G).mean() * torch.eye(len(cols))
    return torch.linalg.solve(G, torch.einsum("rnk,rn->k", S, x)).expand(x.shape[0], -1)


def closed_form(x: torch.Tensor, P: Transform, k: int, sweeps: int, shared: bool = False):
    """k greedy sign steps per row (domain per row and step), least-squares step sizes (per row, or
    one set shared by all rows), then `sweeps` rounds re-picking each sign vector given the others.
    Returns (signs (k, rows, N) ±1, in-P-domain mask (k, rows), step sizes (rows, k))."""
    _lstsq_steps_ = _lstsq_shared if shared else _lstsq_steps
    signs, doms, cols = [], [], []
    rho = x
    for _ in range(k):
        z = P.applyT(rho)
        dom = z.abs().sum(-1, keepdim=True) > rho.abs().sum(-1, keepdim=True)
        s = torch.where(dom, _sign(z), _sign(rho))
        signs.append(s)
        doms.append(dom)
        cols.append(torch.where(dom, P.apply(s), s))
        coef = _lstsq_steps_(cols, x)
        rho = x - (torch.stack(cols, -1) @ coef.unsqueeze(-1)).squeeze(-1)
    for _ in range(sweeps):
        for j in range(k):
            partial = rho + coef[:, j:j + 1] * cols[j]
            s = torch.where(doms[j], _sign(P.applyT(partial)), _sign(partial))
            signs[j] = s
            cols[j] = torch.where(doms[j], P.apply(s), s)
            coef = _lstsq_steps_(cols, x)
            rho = x - (torch.stack(cols, -1) @ coef.unsqueeze(-1)).squeeze(-1)
    return torch.stack(signs), torch.stack(doms).squeeze(-1), coef


def sign_vectors(signs: torch.Tensor, doms: torch.Tensor, P: Transform) -> torch.Tensor:
    """The closed codebook's (k, vectors, N) sign vectors as the weight sees them: P s for the P-domain steps."""
    return torch.where(doms[..., None], P.apply(signs), signs)


def sign_codes(signs: torch.Tensor) -> torch.Tensor:
    """Each weight's `k`-bit index from its (k, vectors, N) signs: bit j is the sign of step j."""
    return ((signs > 0).long() << torch.arange(len(signs))[:, None, None]).sum(0)


def log_coded(signs: torch.Tensor, values: torch.Tensor, log_range: torch.Tensor | None = None):
    """(signs, uint8 log codes of |values|, their log range) for per-vector step sizes (vectors, k) or scales
    (vectors,): log codes hold magnitudes and c s = |c| (sign(c) s), so a negative value flips its signs."""
    flip = _sign(values).T[..., None] if values.dim() == 2 else _sign(values)[None, :, None]
    codes, log_range = log8_encode(values.abs(), log_range)
    return signs * flip, codes, log_range


# --------------------------------------------------------------------------------------------
# Layouts: how the weight is cut into vectors and which metadata each vector stores

LAYOUTS = ("fixed", "auto")
AUTO_SPANS = (1, 2, 4)  # layout="auto" tries vectors 1, 2 and 4 times the configured length
AUTO_ERROR_TIE = 0.01  # layout="auto": relative weight errors within 1 % of the lowest count as equal


def vector_length(group_size: int | None, rows_per_vector: int, out_f: int, in_f: int, name: str) -> int:
    """Kashin's vector length for an (out_f, in_f) layer: a divisor of the input width (group_size),
    the width itself, or rows_per_vector whole consecutive rows (which must divide out_f, so the
    vectors tile the weight)."""
    if rows_per_vector == 1:
        return check_group_size(group_size, in_f, name)
    if out_f % rows_per_vector:
        raise LeanformerError(
            f"Kashin: rows_per_vector={rows_per_vector} does not divide the {out_f} output rows of layer {name}; "
            f"nearest that do: {', '.join(map(str, nearest_divisors(out_f, rows_per_vector)))}")
    return rows_per_vector * in_f


def _fits(length: int, out_f: int, in_f: int) -> bool:
    """Whether vectors of this length tile an (out_f, in_f) weight without crossing a row boundary
    mid-row: a divisor of the width, or whole rows whose count divides out_f."""
    return in_f % length == 0 or (length % in_f == 0 and out_f % (length // in_f) == 0)


@dataclass(frozen=True)
class VectorLayout:
    """One way to store a layer: vector length, step sizes and their coding (closed codebook), column scaling."""
    length: int
    step_sizes: str
    scale_bits: int
    col_scale: bool


@dataclass
class _Vectors:
    """A layer cut into vectors for one (length, col_scale), with its Kashin decomposition's check."""
    x: torch.Tensor            # (vectors, length), column-scaled
    rms: torch.Tensor          # (vectors, 1)
    P: Transform
    col: torch.Tensor | None   # stored column scales (float16) or None
    u: torch.Tensor            # the decomposition x / rms ≈ u + P v (the kmeans codebook quantizes it)
    v: torch.Tensor
    residual: float            # largest relative residual of the decomposition
    iterations: int
    kashin_level: float


def layout_error(weight: torch.Tensor, rebuilt: torch.Tensor) -> float:
    """‖W − Ŵ‖_F / ‖W‖_F, the error layout="auto" compares layouts by."""
    return ((weight - rebuilt).norm() / weight.norm().clamp_min(1e-30)).item()


def _nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


# --------------------------------------------------------------------------------------------
# The stored form: decoding and the forward (shared by every config that stores Kashin layers)


class KashinForm(QuantConfig):
    """What a Kashin layer computes from its stored form: decode, the torch forward and the native kernels.
    Kashin and KashinGPTQ (kashin_gptq.py) differ in how they choose the codes, not in what they store.

    A layer's vectors are pieces of Ŵ's rows (the default) or, with header vectors="columns" (KashinGPTQ), Ŵ's
    whole columns: then what is stored is Ŵᵀ's row vectors, and decode and the forward read it as that
    (in, out) matrix (`_transposed`)."""

    @staticmethod
    def _transposed(header: dict) -> dict | None:
        """For a layer whose vectors are Ŵ's columns, the header of Ŵᵀ as a layer of row vectors; else None."""
        if header.get("vectors", "rows") != "columns":
            return None
        out_f, in_f = header["shape"]
        return {**header, "shape": [in_f, out_f], "vectors": "rows"}

    @staticmethod
    def decode(codes: torch.Tensor, tensors: dict[str, torch.Tensor], header: dict) -> torch.Tensor:
        out_f, in_f = header["shape"]
        transposed = KashinForm._transposed(header)
        if transposed is not None:
            return KashinForm.decode(codes, tensors, transposed).T
        if header["form"] == "matrix":
            seed = int(tensors["seed"][0])
            lab = codes.long()  # a uint8 index would be read as a mask
            c = tensors["codebook"].float()
            q1, q2 = (_matrix(header["transform"], n, s).to(c.device) for n, s in ((out_f, seed), (in_f, seed + 1)))
            xh = c[lab, 0].view(out_f, in_f) + q1 @ c[lab, 1].view(out_f, in_f) @ q2.T
            return xh * tensors["scale"].float()
        w, _ = KashinForm._rebuild(codes, tensors, header, reordered=False)
        col = tensors["col_scale"].float() if "col_scale" in tensors else 1.0
        return w.view(out_f, in_f) * col

    @classmethod
    def linear(cls, x: torch.Tensor, codes: torch.Tensor, tensors: dict[str, torch.Tensor], header: dict,
               bias: torch.Tensor | None) -> torch.Tensor:
        """y = x Ŵᵀ + b without forming what costs most. Per vector Ŵ = (A + P B)·diag(col), so
        x Ŵᵀ = x_c Aᵀ + (Pᵀ x_c) Bᵀ with x_c = x·diag(col): with few tokens P goes on the activations
        (one matmul against A and B side by side; no transform of the weight), with many on the weight,
        read in the FFT's order so that only the activations are reordered (`ACTIVATION_ROUTE_TOKENS`).
        The matrix form rebuilds its weight (the default)."""
        out_f, in_f = header["shape"]
        if header["form"] == "matrix":
            return super().linear(x, codes, tensors, header, bias)
        if x.shape[-1] != in_f:
            raise LeanformerError(f"Kashin layer of shape {out_f}x{in_f}: the input's last dimension is {x.shape[-1]}, "
                                  f"it must be the layer's input width {in_f}")
        transposed = cls._transposed(header)
        if transposed is not None:
            return cls._linear_columns(x, codes, tensors, transposed, bias)
        g = header["group_size"]
        rows = g // in_f if g > in_f else 1  # whole rows per vector (rows_per_vector), else 1
        tokens = x.numel() // in_f
        xc = x.reshape(tokens, in_f).float()
        col = tensors["col_scale"].float() if "col_scale" in tensors else None
        # the activation route multiplies against twice the weights (A and B), rows times over for whole-row
        # vectors; the weight route transforms the weight once, whatever the tokens
        if tokens * rows <= ACTIVATION_ROUTE_TOKENS:
            y = cls._linear_on_activations(xc if col is None else xc * col, codes, tensors, header)
            if y is not None:
                y = y.to(x.dtype) if bias is None else (y.to(x.dtype) + bias)
                return y.view(*x.shape[:-1], out_f)
        # reorder, and scale by the column scales, whichever is smaller: the activations (tokens × in) or the
        # weight (out × in)
        on_x = tokens < out_f
        w, order = cls._rebuild(codes, tensors, header, reordered=rows == 1 and on_x)
        if col is not None:
            xc, w = (xc * col, w) if on_x else (xc, w.view(out_f, in_f).mul_(col))
        if order is not None:  # w is each vector in Makhoul's order; read x the same way instead of w back
            xc = xc.view(tokens, in_f // g, g).index_select(-1, order).view(tokens, in_f)
        y = F.linear(xc.to(x.dtype), w.view(out_f, in_f).to(x.dtype), bias)
        return y.view(*x.shape[:-1], out_f)

    @classmethod
    def _linear_columns(cls, x: torch.Tensor, codes: torch.Tensor, tensors: dict[str, torch.Tensor], transposed: dict,
                        bias: torch.Tensor | None) -> torch.Tensor:
        """y = x Ŵᵀ + b for vectors along Ŵ's columns, `transposed` the header of Ŵᵀ = A + P B (rows): with fewer
        tokens than inputs, y = x A + P (x B), P on each token's output; else the weight rebuilt (one transform
        per input) and one matmul."""
        in_f, out_f = transposed["shape"]
        tokens = x.numel() // in_f
        if tokens >= in_f:
            return F.linear(x, cls.decode(codes, tensors, transposed).T.to(x.dtype), bias)
        table_a, table_b = cls._tables(tensors, transposed, in_f)
        idx = cls._indices(codes, in_f, transposed["bits"]).view(-1)
        x2 = x.reshape(tokens, in_f).float()
        y = x2 @ table_a.reshape(-1).index_select(0, idx).view(in_f, out_f)
        if table_b is not None:
            P = Transform(transposed["transform"], out_f, int(tensors["seed"][0]))
            y = y + P.apply(x2 @ table_b.reshape(-1).index_select(0, idx).view(in_f, out_f))
        y = y.to(x.dtype) if bias is None else (y.to(x.dtype) + bias)
        return y.view(*x.shape[:-1], out_f)

    @staticmethod
    def _tables(tensors: dict[str, torch.Tensor], header: dict, n_vec: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-vector lookup tables (vectors, 2^bits) of A and B, Ŵ = A + P B per vector before the column
        scales: each vector's A and B take one of 2^bits values per weight, read with its code. B is None
        when no vector has a step in the P domain."""
        bits = header["bits"]
        if header["codebook"] == "kmeans":
            c, scale = tensors["codebook"].float(), tensors["scale"].float()[:, None]
            return scale * c[:, 0], scale * c[:, 1]
        steps, scale = tensors["steps"], tensors.get("scale")
        if "log_range" in tensors:  # 8-bit log-coded step sizes (or per-vector scales)
            if scale is None:
                steps = log8_decode(steps, tensors["log_range"])
            else:
                scale = log8_decode(scale, tensors["log_range"])
        steps = steps.float().expand(n_vec, -1)                                  # (vectors, k)
        if scale is not None:  # shared step sizes, one scale per vector
            steps = steps * scale.float()[:, None]
        doms = unpack_bits(tensors["domains"], 1, n_vec * bits).view(n_vec, bits).float().to(steps.device)
        # Σ_j c_j s_j split by domain: A = Σ_plain c_j s_j, B = Σ_P c_j s_j, so P is applied once
        arange = torch.arange(bits, device=steps.device)
        patterns = ((torch.arange(2 ** bits, device=steps.device)[:, None] >> arange) & 1).float() * 2 - 1  # (2^k, k)
        table_a = (steps * (1 - doms)) @ patterns.T
        return table_a, (steps * doms) @ patterns.T if doms.any() else None

    @staticmethod
    def _indices(codes: torch.Tensor, n_vec: int, bits: int, first: int = 0) -> torch.Tensor:
        """(vectors, length): each weight's row in the flattened (vectors · 2^bits) tables, its code +
        2^bits · its vector, for the codes of vectors first, first + 1, …"""
        dtype = torch.int32 if (first + n_vec) * 2 ** bits < 2 ** 31 else torch.int64  # int32: half the traffic
        offsets = torch.arange(first, first + n_vec, device=codes.device, dtype=dtype)[:, None] * 2 ** bits
        return codes.view(n_vec, -1) + offsets  # uint8 + int: one pass, promoted

    @staticmethod
    def _rebuild(codes: torch.Tensor, tensors: dict[str, torch.Tensor], header: dict, reordered: bool):
        """The (vectors, length) weight A + P B before the column scales, and None; with reordered=True and
        the FFT form of P, each vector in Makhoul's order instead (no pass to put it back) and that order.
        Built REBUILD_CHUNK weights at a time into one output: the temporaries (indices, B, its spectrum)
        stay small, in cache, and are reused by the allocator instead of being mapped afresh each forward."""
        out_f, in_f = header["shape"]
        g, bits = header["group_size"], header["bits"]
        n_vec = out_f * in_f // g  # a vector is part of a row, a row, or several whole rows
        P = Transform(header["transform"], g, int(tensors["seed"][0]))
        table_a, table_b = KashinForm._tables(tensors, header, n_vec)
        table_a, codes = table_a.reshape(-1), codes.view(n_vec, g)
        fft = table_b is not None and not P.dense
        order, inverse = P.order(codes.device) if fft else (None, None)
        w = torch.empty(n_vec, g, device=codes.device)
        step = max(1, REBUILD_CHUNK // g)
        for first in range(0, n_vec, step):
            last = min(n_vec, first + step)
            part = w[first:last]
            idx = KashinForm._indices(codes[first:last], last - first, bits, first)
            if fft:  # read the codes in the FFT's order: B comes out ready for apply_reordered, A matches its output
                idx = idx.index_select(1, order)
            idx = idx.view(-1)
            if table_b is None:
                torch.index_select(table_a, 0, idx, out=part.view(-1))
                continue
            a = table_a.index_select(0, idx).view(-1, g)
            b = table_b.reshape(-1).index_select(0, idx).view(-1, g)
            if fft:
                P.apply_reordered(b, out=part).add_(a)
            else:
                torch.addmm(a, b, P.matrix(b.device).T, out=part)
        if fft and not reordered:
            return w.index_select(1, inverse), None
        return w, order

    @staticmethod
    def _rebuild_native(header: dict, P: "Transform", has_b: bool, lookup, combine, spectral_map) -> torch.Tensor:
        """The column-scaled (vectors, length) weight from the fused kernels (lowbit.cpp), REBUILD_CHUNK weights
        at a time so that B and P B stay in cache: lookup(first, fft, b) writes B of a block of vectors (in the
        FFT's order when fft), P goes on it (by FFT, its middle step `spectral_map`, or P's dense matrix for
        short vectors), and combine(first, pb, fft, out) writes (A + P B)·diag(col) in the natural order."""
        out_f, in_f = header["shape"]
        g = header["group_size"]
        n_vec = out_f * in_f // g
        fft = has_b and not P.dense
        w = torch.empty(n_vec, g, dtype=torch.float32)  # the kernels' dtype, whatever torch's default
        step = max(1, REBUILD_CHUNK // g)
        b_block = torch.empty(min(step, n_vec), g, dtype=torch.float32) if has_b else None
        for first in range(0, n_vec, step):
            last = min(n_vec, first + step)
            pb = None
            if has_b:
                b = b_block[: last - first]
                lookup(first, fft, b)
                pb = P.apply_reordered(b, spectral_map=spectral_map) if fft else b @ P.matrix(b.device).T
            combine(first, pb, fft, w[first:last])
        return w

    @staticmethod
    def _linear_on_activations(xc: torch.Tensor, codes: torch.Tensor, tensors: dict[str, torch.Tensor],
                               header: dict) -> torch.Tensor | None:
        """x_c Aᵀ + (Pᵀ x_c) Bᵀ for column-scaled inputs xc (tokens, in) as one matmul, float32; None when B
        is 0 (then the weight route is A alone). A vector of `rows` whole rows gives output row j of its
        block from the input placed at slot j of a zero vector of its length."""
        out_f, in_f = header["shape"]
        g, bits = header["group_size"], header["bits"]
        n_vec = out_f * in_f // g
        table_a, table_b = KashinForm._tables(tensors, header, n_vec)
        if table_b is None:
            return None
        # A and B of each weight side by side, (vectors · length, 2), from one lookup
        ab = torch.stack([table_a, table_b], -1).view(-1, 2).index_select(0, KashinForm._indices(codes, n_vec, bits).view(-1))
        tokens = xc.shape[0]
        inputs = torch.stack(KashinForm._vector_inputs(xc, tensors, header), -1)
        if g <= in_f:
            return inputs.view(tokens, 2 * in_f) @ ab.view(out_f, 2 * in_f).T
        rows = g // in_f
        y = inputs.view(tokens * rows, 2 * g) @ ab.view(n_vec, 2 * g).T             # (tokens · rows, vectors)
        return y.view(tokens, rows, n_vec).transpose(1, 2).reshape(tokens, out_f)

    @staticmethod
    def _vector_inputs(xc: torch.Tensor, tensors: dict[str, torch.Tensor], header: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """What each vector multiplies on the activation route, for column-scaled inputs xc (tokens, in): e, the
        input cut into vectors (tokens, in / g, g), or for vectors of r whole rows placed at slot j of a zero
        vector for output row j (tokens, r, g); and u = Pᵀ e."""
        in_f, g = header["shape"][1], header["group_size"]
        P = Transform(header["transform"], g, int(tensors["seed"][0]))
        tokens = xc.shape[0]
        if g <= in_f:
            e = xc.view(tokens, in_f // g, g)
        else:
            rows = g // in_f
            e = xc.new_zeros(tokens, rows, rows, in_f)
            e.diagonal(dim1=1, dim2=2).copy_(xc[:, :, None])  # e[t, j, j] = x_t: row j of the block reads slot j
            e = e.view(tokens, rows, g)
        return e, P.rows(e, transpose=True)

    @classmethod
    def native_linear(cls, ops, codes, tensors, header, bias):
        """The closed codebook's kernels (lowbit.cpp KashinLayer), by the number of tokens. Vectors along rows: up to
        TABLE_KERNEL_TOKENS the table route (kashin_linear: the codes read through per-vector tables, against x_c and
        u = Pᵀ x_c), up to ACTIVATION_ROUTE_TOKENS the middle route (KashinLayer.middle: A and B decoded a block of
        rows at a time, one matmul; vectors within a row of up to 4 bits, others keep the table route up to
        TABLE_ONLY_TOKENS). Vectors along columns (KashinGPTQ): up to COLUMN_TABLE_TOKENS the table route
        (KashinLayer.columns: per input its tables scaled by x_i and read with its codes, summed over the outputs,
        then P on the output), up to COLUMN_MIDDLE_TOKENS the middle route (columns_middle: x A and x B by blocks of
        decoded rows). Above, the stored weight rebuilt by the weight-route kernels (`_rebuild_native`) and
        multiplied once. Vectors up to ACTIVATION_DENSE_MAX long hand P's dense matrix to the kernels, longer ones
        apply P by FFT here; with P dense the layer calls the kernel object itself, which takes the table route and
        hands other inputs to the router here (KashinLayer.bind_route). Other forms and codebooks have no kernel."""
        if header["form"] != "vector" or header["codebook"] != "closed":
            return None
        transposed = cls._transposed(header)
        columns = transposed is not None
        stored = transposed or header  # the stored rows: Ŵ's, or Ŵᵀ's for vectors along columns
        out_s, in_s = stored["shape"]
        out_f, in_f = header["shape"]
        g, bits = header["group_size"], header["bits"]
        P = Transform(header["transform"], g, int(tensors["seed"][0]))
        col = tensors["col_scale"].float() if "col_scale" in tensors else None
        # log-coded step sizes: the 256 values the codes stand for, once here instead of exp2 per vector per call
        log_values = (log8_decode(torch.arange(256, dtype=torch.uint8), tensors["log_range"]).contiguous()
                      if "log_range" in tensors else None)
        steps = (tensors["steps"], tensors.get("scale"), log_values, tensors["domains"])
        n_vec, rows = out_s * in_s // g, (g // in_s if g > in_s else 1)
        lookup = functools.partial(ops.kashin_lookup, codes, *steps, n_vec, g, bits)
        combine = functools.partial(ops.kashin_combine, codes, *steps, n_vec, g, bits, col, in_s)
        has_b = bool(tensors["domains"].any())

        def weight_route(x: torch.Tensor) -> torch.Tensor:  # many tokens: the weight rebuilt once, then one matmul
            w = cls._rebuild_native(stored, P, has_b, lookup, combine, ops.spectral_map).view(out_s, in_s)
            return F.linear(x, w.T if columns else w, bias)

        # the kernel applies P's matrix itself when it is dense (one matrix per length, shared by every layer; on
        # the output for column vectors, where it computes P z as Σ_n z_n M[n, ·], so P's matrix transposed)
        dense = P.dense or g <= ACTIVATION_DENSE_MAX
        fused = ops.KashinLayer(codes, *steps, col, P.matrix(codes.device, transpose=columns) if dense else None,
                                P.butterfly(codes.device) if dense else None, bias, out_s, in_s, g, bits)
        if columns:
            table = bits <= 4 and g % 2 == 0
            direct_tokens = COLUMN_TABLE_TOKENS if table else 0

            def run(x: torch.Tensor) -> torch.Tensor:
                if x.shape[-1] != in_f:
                    return None  # (linear names the wrong width)
                tokens = x.numel() // in_f
                if not table or tokens > COLUMN_MIDDLE_TOKENS:
                    return weight_route(x)
                if dense:  # (up to COLUMN_TABLE_TOKENS the kernel took its table route)
                    return kernel().columns_middle(x)
                # long columns: the kernel's two sums, then P by FFT here
                parts = kernel().columns_parts if tokens <= direct_tokens else kernel().columns_middle_parts
                y_a, y_b = parts(x)
                return (y_a + P.apply(y_b)).view(*x.shape[:-1], out_f)
        else:
            # the middle route (vectors within a row, up to 4 bits): A and B decoded a block of rows at a time
            middle = g <= in_f and g % 2 == 0 and bits <= 4
            # the thresholds as when bound
            direct_tokens = TABLE_KERNEL_TOKENS if middle else min(TABLE_ONLY_TOKENS, ACTIVATION_ROUTE_TOKENS)
            activation_tokens = ACTIVATION_ROUTE_TOKENS

            def run(x: torch.Tensor) -> torch.Tensor:
                if x.shape[-1] != in_f:
                    return weight_route(x)  # (F.linear names the wrong width)
                tokens = x.numel() // in_f * rows
                if tokens > activation_tokens or (tokens > direct_tokens and not middle):
                    return weight_route(x)
                x2 = x.reshape(-1, in_f)
                u = None if dense else cls._vector_inputs(x2 if col is None else x2 * col, tensors, header)[1]
                return kernel().table(x, u) if tokens <= direct_tokens else kernel().middle(x, u)
        # with P dense and a route of its own the kernel routes a few tokens itself and hands the rest to `run`, which
        # then must hold it weakly (a strong reference would be a cycle through the C++ object, which the garbage
        # collector cannot see); otherwise the layer holds `run`, and `run` the kernel
        routes_itself = dense and direct_tokens > 0
        kernel = weakref.ref(fused) if routes_itself else (lambda: fused)
        if not routes_itself:
            return run
        fused.bind_route(direct_tokens, columns, run)  # one token of a decode step: no Python past the module
        return fused


# --------------------------------------------------------------------------------------------
# The config


@dataclass
class Kashin(KashinForm):
    transform: str = field(default="dct", metadata={
        "help": "orthogonal transform P: dct (sign-randomised DCT, O(N log N)) or random (dense orthogonal)",
        "choices": TRANSFORMS})
    codebook: str = field(default="closed", metadata={
        "help": "factor quantizer: closed (greedy sign steps, least-squares step sizes) or kmeans "
                "(joint (u, v) codebook)", "choices": CODEBOOKS})
    form: str = field(default="vector", metadata={
        "help": "vector (per row / group) or matrix (U + Q1 V Q2ᵀ per layer; kmeans only)", "choices": FORMS})
    group_size: int | None = group_size_field(None)  # a group is one Kashin vector
    rows_per_vector: int = field(default=1, metadata={
        "help": "vector form: join this many consecutive rows into one Kashin vector (must divide each layer's "
                "output rows; group_size none). Per-vector metadata is then spread over more weights: for "
                "narrow layers, whose rows are short"})
    sweeps: int = field(default=4, metadata={"help": "closed codebook: refinement rounds over the sign vectors"})
    step_sizes: str = field(default="vector", metadata={
        "help": "closed codebook: vector (bits fp16 step sizes per vector) or shared (one set per layer + one "
                "fp16 scale per vector: less metadata, for narrow layers)", "choices": STEP_SIZES})
    scale_bits: int = scale_bits_field()
    col_scale: bool = col_scale_field(True)
    layout: str = field(default="fixed", metadata={
        "help": "vector form: fixed (the vector length, step_sizes, scale_bits and col_scale given) or auto (per "
                "layer, also try vectors 2 and 4 times as long, the other step_sizes and scale_bits, col_scale "
                "off/on; among the layouts storing no more bytes than the given one, keep the fewest bytes whose "
                "weight error ‖W − Ŵ‖/‖W‖ is within 1 percent of the lowest; the choice is saved per layer)",
        "choices": LAYOUTS})
    tol: float = field(default=1e-3, metadata={
        "help": "convergence: the decomposition's ‖residual‖ / ‖x‖ must fall below this within max_iter steps"})
    max_iter: int = field(default=200, metadata={"help": "greedy iterations allowed to reach tol"})
    kmeans_iters: int = field(default=30, metadata={"help": "kmeans codebook: Lloyd iterations"})
    seed: int = field(default=0, metadata={
        "help": "seed of the transform's random signs / matrix: one P per vector length, shared by every layer"})

    method: ClassVar[str] = "kashin"
    SUPPORTED_BITS: ClassVar[tuple[int, ...]] = (2, 3, 4, 5, 6, 8)

    def __post_init__(self):
        super().__post_init__()
        for field_, value, choices in (("transform", self.transform, TRANSFORMS), ("form", self.form, FORMS),
                                       ("codebook", self.codebook, CODEBOOKS), ("step_sizes", self.step_sizes, STEP_SIZES),
                                       ("layout", self.layout, LAYOUTS)):
            if value not in choices:
                raise LeanformerError(f"Kashin: unknown {field_} {value!r}; choose from {', '.join(choices)}")
        if self.form == "matrix" and (self.group_size is not None or self.codebook != "kmeans"):
            raise LeanformerError("Kashin: form='matrix' quantizes whole layers with a k-means codebook; "
                                  "use codebook='kmeans' and no group_size with it")
        if self.form == "matrix" and (self.rows_per_vector != 1 or self.layout != "fixed"):
            raise LeanformerError("Kashin: rows_per_vector and layout='auto' choose vectors of the vector form; "
                                  "form='matrix' has none (use rows_per_vector=1, layout='fixed' with it)")
        if not isinstance(self.rows_per_vector, int) or self.rows_per_vector < 1:
            raise LeanformerError(f"Kashin: rows_per_vector must be a positive integer, got {self.rows_per_vector!r}")
        if self.rows_per_vector > 1 and self.group_size is not None:
            raise LeanformerError(f"Kashin: give either group_size={self.group_size} (a vector is part of a row) or "
                                  f"rows_per_vector={self.rows_per_vector} (a vector is several whole rows), not both")
        if self.scale_bits not in SCALE_BITS:
            raise LeanformerError(f"Kashin: scale_bits must be one of {', '.join(map(str, SCALE_BITS))}, "
                                  f"got {self.scale_bits!r}")
        if self.scale_bits != 16 and self.codebook != "closed":
            raise LeanformerError("Kashin: scale_bits codes the closed codebook's step sizes; codebook='kmeans' "
                                  "stores float16 scales (use scale_bits=16 with it)")
        if not 0 < self.tol < 1:
            raise LeanformerError(f"Kashin: tol must be in (0, 1), got {self.tol}")

    def quantize_weight(self, weight: torch.Tensor, name: str):
        out_f, in_f = weight.shape
        # One P per vector length for the whole model, as QuaRot (Ashkboos et al., 2024) rotates every layer's
        # input by the same random Hadamard matrix: the forward keeps one matrix per length in cache, where one
        # per layer evicted the codes. On stories260K at 3 bits, the weight error is the same (0.1747 against
        # 0.1744 with a P per layer) and batch-1 generation went from 0.92x to 0.96x fp32's tokens/s (same
        # process). The seed is still stored per layer, so models saved with a P per layer load as they were.
        seed = self.seed
        if self.form == "matrix":
            return self._matrix(weight, name, seed)
        given = VectorLayout(vector_length(self.group_size, self.rows_per_vector, out_f, in_f, name),
                             self.step_sizes, self.scale_bits, self.col_scale)
        if self.layout == "auto":
            return self._auto(weight, seed, given)
        vectors = self._vectors(weight, seed, given.length, given.col_scale)
        self._check_converged(vectors)
        return self._encode(vectors, self._fit(vectors, given.step_sizes, seed), given, seed)

    def _auto(self, weight: torch.Tensor, seed: int, given: VectorLayout):
        """layout="auto": the candidate layouts are vectors 1, 2 and 4 times the given length (where they
        tile the weight), both step_sizes, scale_bits 16 and 8, col_scale on and off; those storing more
        bytes than the given layout are out. Among the rest: the lowest relative error ‖W − Ŵ‖_F / ‖W‖_F,
        where errors within AUTO_ERROR_TIE (1 %) of the lowest count as equal and the fewest bytes wins
        among them (then the candidates' order, the given layout first). So auto is never larger than
        the given layout and never measurably less accurate; it keeps the metadata that buys accuracy
        and drops what does not (8-bit step sizes on short rows cost ≈0.1 % error).

        Not a bits-for-error trade (e.g. the lowest e · 2^b, one bit per halving of the error): on
        stories260K that picks whole-row vectors and no column scaling, which lower the Frobenius
        error per bit but cost far more perplexity than the error shows (rows of different size then
        share step sizes, and columns reading outlier features lose precision)."""
        out_f, in_f = weight.shape
        lengths = [given.length * m for m in AUTO_SPANS if _fits(given.length * m, out_f, in_f)]
        if self.codebook == "closed":
            step_options = (given.step_sizes,) + tuple(s for s in STEP_SIZES if s != given.step_sizes)
            bits_options = (given.scale_bits,) + tuple(b for b in SCALE_BITS if b != given.scale_bits)
        else:  # step sizes and their coding are the closed codebook's; kmeans stores a codebook
            step_options, bits_options = (given.step_sizes,), (given.scale_bits,)
        budget, candidates, unconverged = None, [], None
        for col_scale in (given.col_scale, not given.col_scale):
            for length in lengths:
                vectors = self._vectors(weight, seed, length, col_scale)
                for step_sizes in step_options:
                    fit = self._fit(vectors, step_sizes, seed)
                    for scale_bits in bits_options:
                        layout = VectorLayout(length, step_sizes, scale_bits, col_scale)
                        tensors, header = self._encode(vectors, fit, layout, seed)
                        nbytes = _nbytes(tensors)
                        if layout == given:  # the first candidate: it sets the budget, converged or not
                            budget = nbytes
                        if vectors.residual >= self.tol:
                            unconverged = unconverged or vectors
                            continue
                        if nbytes > budget:
                            continue
                        w = self.dequantize(tensors, {**header, "bits": self.bits, "shape": [out_f, in_f]})
                        candidates.append((layout_error(weight, w), nbytes, tensors, header))
        if not candidates:
            self._check_converged(unconverged)
        lowest = min(c[0] for c in candidates)
        _, _, tensors, header = min((c for c in candidates if c[0] <= (1 + AUTO_ERROR_TIE) * lowest),
                                    key=lambda c: c[1])  # min keeps the first of equal sizes
        return tensors, {**header, "layout": "auto"}

    def _vectors(self, weight: torch.Tensor, seed: int, length: int, col_scale: bool) -> _Vectors:
        col = column_rms(weight) if col_scale else None
        if col is not None:
            # Input columns of very different size (features that carry outlier activations tend to have
            # them) get the same relative precision: the decomposition spreads error evenly over a vector.
            weight = weight / col.float()
        x = weight.reshape(-1, length)
        # unit-RMS vectors: one tolerance and one codebook fit every vector of the layer
        rms = (x.norm(dim=1, keepdim=True) / math.sqrt(length)).clamp_min(1e-12)
        P = Transform(self.transform, length, seed)
        u, v, rel, it = kashin_vectors(x / rms, P, self.tol, self.max_iter)
        level = max(u.abs().max().item(), v.abs().max().item())
        return _Vectors(x, rms, P, col, u, v, rel.max().item(), it, level)

    def _check_converged(self, vectors: _Vectors) -> None:
        if vectors.residual >= self.tol:
            raise NotConverged(f"Kashin decomposition residual {vectors.residual:.2e} ≥ tol {self.tol:g} "
                               f"after {vectors.iterations} iterations")

    def _fit(self, vectors: _Vectors, step_sizes: str, seed: int):
        """Closed codebook: (signs (k, vectors, N) ±1, in-P-domain mask (k, vectors), step sizes, per-vector
        scales): step sizes (vectors, k) and no scales, or with shared step sizes one float16 set (1, k)
        and a least-squares scale per vector. kmeans: (centroids, labels)."""
        x, rms, P = vectors.x, vectors.rms, vectors.P
        if self.codebook == "kmeans":
            return self._codebook(vectors.u, vectors.v, seed)
        shared = step_sizes == "shared"
        xn = x / rms if shared else x  # shared steps fit unit-RMS vectors; a per-vector scale restores them
        signs, doms, coef = closed_form(xn, P, self.bits, self.sweeps, shared=shared)
        if not shared:
            return signs, doms, coef, None
        steps = fp16(coef[:1])
        xh = torch.einsum("kvn,k->vn", sign_vectors(signs, doms, P), steps.float()[0])
        energy = (xh * xh).sum(1)
        scale = torch.where(energy > 0, (x * xh).sum(1) / energy.clamp_min(1e-30), rms[:, 0])
        return signs, doms, steps, scale

    def _encode(self, vectors: _Vectors, fit: tuple, layout: VectorLayout, seed: int):
        """Stored tensors and header of one layout, from its vectors and the codebook's fit to them."""
        header = {"form": "vector", "codebook": self.codebook, "transform": self.transform,
                  "group_size": layout.length, "col_scale": layout.col_scale, "iterations": vectors.iterations,
                  "kashin_level": vectors.kashin_level}
        tensors = {"seed": torch.tensor([seed], dtype=torch.int64)}
        if vectors.col is not None:
            tensors["col_scale"] = vectors.col
        if self.codebook == "kmeans":
            return {**tensors, **self._kmeans_tensors(vectors, *fit)}, header
        signs, doms, steps, scale = fit
        if layout.scale_bits == 8:
            if scale is None:
                signs, steps, log_range = log_coded(signs, steps)
            else:
                signs, scale, log_range = log_coded(signs, scale)
            tensors["log_range"] = log_range
        else:
            steps, scale = fp16(steps), None if scale is None else fp16(scale)
        tensors["steps"] = steps
        if scale is not None:
            tensors["scale"] = scale
        tensors.update(packed=pack_bits(sign_codes(signs), self.bits), domains=pack_bits(doms.T.long(), 1))
        header.update(step_sizes=layout.step_sizes, scale_bits=layout.scale_bits)
        return tensors, header

    def _kmeans_tensors(self, vectors: _Vectors, cent: torch.Tensor, lab: torch.Tensor) -> dict:
        x, P = vectors.x, vectors.P
        c = cent.float()
        xh = c[lab, 0].view_as(x) + P.apply(c[lab, 1].view_as(x))
        # closed-form least-squares scale per vector for the quantized direction
        energy = (xh * xh).sum(1, keepdim=True)
        scale = torch.where(energy > 0, (x * xh).sum(1, keepdim=True) / energy.clamp_min(1e-30), vectors.rms)
        return {"packed": pack_bits(lab, self.bits), "codebook": cent, "scale": fp16(scale.reshape(-1))}

    def _codebook(self, u, v, seed):
        pts = torch.stack([u.reshape(-1), v.reshape(-1)], 1)
        cent, lab = kmeans(pts, 2 ** self.bits, iters=self.kmeans_iters, seed=seed)
        return fp16(cent), lab

    def _matrix(self, weight, name, seed):
        out_f, in_f = weight.shape
        q1, q2 = _matrix(self.transform, out_f, seed), _matrix(self.transform, in_f, seed + 1)
        norm = weight.norm().clamp_min(1e-30)
        x = weight / norm * math.sqrt(weight.numel())  # unit RMS
        U, V, rel, it = kashin_matrix(x, q1, q2, self.tol, self.max_iter)
        if rel >= self.tol:
            raise NotConverged(f"Kashin decomposition residual {rel.item():.2e} ≥ tol {self.tol:g} after {it} iterations")
        cent, lab = self._codebook(U, V, seed)
        c = cent.float()
        xh = c[lab, 0].view_as(x) + q1 @ c[lab, 1].view_as(x) @ q2.T
        scale = (weight * xh).sum() / (xh * xh).sum().clamp_min(1e-30)
        tensors = {"packed": pack_bits(lab, self.bits), "codebook": cent, "scale": scale.reshape(1).float(),
                   "seed": torch.tensor([seed], dtype=torch.int64)}
        header = {"form": "matrix", "codebook": "kmeans", "transform": self.transform, "group_size": None,
                  "iterations": it, "kashin_level": max(U.abs().max().item(), V.abs().max().item())}
        return tensors, header

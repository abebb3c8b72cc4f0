"""Kashin quantization (Merkulov et al., "Quantization of Large Language Models with an Overdetermined Basis", UAI 2024).

Each weight vector x (a row of W, or a group of `group_size` consecutive entries of a row) is
written through a Kashin representation x ≈ u + P v, P orthogonal, u and v of small ∞-norm. The
greedy that builds it adds one scaled sign vector per step, in the plain domain (Δu = sign(ρ)‖ρ‖₁/N)
or the transformed one (Δv = sign(Pᵀρ)‖Pᵀρ‖₁/N), so its factors concentrate on a few values.

P is the fast structured transform P z = IDCT(ε ⊙ DCT(z)) (sign-randomised DCT, O(N log N), ε from
a seed; transform="random" uses a dense random orthogonal P, O(N²)).

Two ways to quantize the factors (`codebook`):
- "closed" (default; the structured follow-up): keep `bits` greedy steps per vector, each one sign
  bit per weight in whichever domain (plain or P) removes more of the residual, with the step sizes
  refit jointly by least squares (the closed-form centroids: u takes the values ±c1 ±c2 …) and a
  few sweeps that re-pick each sign vector given the others. Stored: one `bits`-bit index per weight
  (its sign bits), per vector `bits` float16 step sizes and `bits` domain bits, the seed; with
  step_sizes="shared", one set of step sizes per layer and one float16 scale per vector instead.
- "kmeans" (the reference): run the greedy to `tol`, then quantize the pairs (u_i, v_i) jointly with
  a k-means codebook of 2^bits points (float16) shared by the layer, plus a float16 scale per
  vector refit by least squares. form="matrix" is the reference's matrix form X ≈ U + Q1 V Q2ᵀ
  (Q1, Q2 sign-randomised DCT or random orthogonal, whole-layer, float32 norm), for comparison.

In the vector form the input columns are first divided by their RMS (`col_scale`, one float16 per
input column, stored): the decomposition spreads error evenly along a row, and this keeps columns
of small weights (often the ones reading outlier activation features) from losing all precision.

Both check that the layer's Kashin decomposition converges (alternating greedy to `tol` within
`max_iter` steps); a layer that does not raises NotConverged and stays in full precision.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import ClassVar

import torch

from ..errors import LeanformerError
from .kmeans import kmeans
from .packing import fp16, pack_bits, unpack_bits
from .quantization import NotConverged, QuantConfig, check_group_size, group_size_field

TRANSFORMS = ("dct", "random")
FORMS = ("vector", "matrix")


# --------------------------------------------------------------------------------------------
# Orthonormal DCT-II / DCT-III along the last dimension via one FFT (Makhoul 1980)


@lru_cache(maxsize=64)
def _twiddle(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    k = torch.arange(n, dtype=torch.float64) * math.pi / (2 * n)
    scale = torch.full((n,), math.sqrt(2.0 / n), dtype=torch.float64)
    scale[0] = math.sqrt(1.0 / n)
    return torch.polar(torch.ones(n, dtype=torch.float64), -k).to(torch.complex64), scale.float()


def dct(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[-1]
    w, scale = (t.to(x.device) for t in _twiddle(n))
    v = torch.cat([x[..., ::2], x[..., 1::2].flip(-1)], dim=-1)
    return (torch.fft.fft(v, dim=-1) * w).real * scale


def idct(y: torch.Tensor) -> torch.Tensor:
    n = y.shape[-1]
    w, scale = (t.to(y.device) for t in _twiddle(n))
    # v real ⇒ V_{N−k} = conj(V_k), which gives e^{−iπk/2N} V_k = Y_k − i Y_{N−k} (Y_N := 0)
    yk = y / scale
    yrev = torch.cat([torch.zeros_like(yk[..., :1]), yk[..., 1:].flip(-1)], dim=-1)
    v = torch.fft.ifft(torch.complex(yk, -yrev) * w.conj(), dim=-1).real
    x = torch.empty_like(v)
    half = (n + 1) // 2
    x[..., ::2] = v[..., :half]
    x[..., 1::2] = v[..., half:].flip(-1)
    return x


def _signs(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=g).float() * 2 - 1


@lru_cache(maxsize=16)
def _random_orthogonal(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()  # sign fix: a unique, Haar-distributed Q


@lru_cache(maxsize=16)
def _dct_matrix(n: int, seed: int) -> torch.Tensor:
    """Dense form of P = IDCT·diag(ε)·DCT (used by the matrix form)."""
    return idct(_signs(n, seed) * dct(torch.eye(n))).T.contiguous()  # column j = P e_j


class Transform:
    """The orthogonal P along the last dimension: apply(z) = P z, applyT(z) = Pᵀ z."""

    def __init__(self, kind: str, n: int, seed: int):
        self.kind, self.n = kind, n
        if kind == "dct":
            self.eps = _signs(n, seed)  # P is symmetric and an involution: Pᵀ = P
        else:
            self.q = _random_orthogonal(n, seed)

    def apply(self, z):
        return idct(self.eps.to(z.device) * dct(z)) if self.kind == "dct" else z @ self.q.to(z.device).T

    def applyT(self, z):
        return idct(self.eps.to(z.device) * dct(z)) if self.kind == "dct" else z @ self.q.to(z.device)


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
# The config


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


# --------------------------------------------------------------------------------------------
# The config


@dataclass
class Kashin(QuantConfig):
    transform: str = field(default="dct", metadata={
        "help": "orthogonal transform P: dct (sign-randomised DCT, O(N log N)) or random (dense orthogonal)",
        "choices": TRANSFORMS})
    codebook: str = field(default="closed", metadata={
        "help": "factor quantizer: closed (greedy sign steps, least-squares step sizes) or kmeans "
                "(joint (u, v) codebook)", "choices": CODEBOOKS})
    form: str = field(default="vector", metadata={
        "help": "vector (per row / group) or matrix (U + Q1 V Q2ᵀ per layer; kmeans only)", "choices": FORMS})
    group_size: int | None = group_size_field(None)  # a group is one Kashin vector
    sweeps: int = field(default=4, metadata={"help": "closed codebook: refinement rounds over the sign vectors"})
    step_sizes: str = field(default="vector", metadata={
        "help": "closed codebook: vector (bits fp16 step sizes per vector) or shared (one set per layer + one "
                "fp16 scale per vector: less metadata, for narrow layers)", "choices": STEP_SIZES})
    col_scale: bool = field(default=True, metadata={
        "help": "vector form: divide input columns by their RMS first (one fp16 per column, stored)"})
    tol: float = field(default=1e-3, metadata={
        "help": "convergence: the decomposition's ‖residual‖ / ‖x‖ must fall below this within max_iter steps"})
    max_iter: int = field(default=200, metadata={"help": "greedy iterations allowed to reach tol"})
    kmeans_iters: int = field(default=30, metadata={"help": "kmeans codebook: Lloyd iterations"})
    seed: int = field(default=0, metadata={"help": "seed of the transform's random signs / matrix"})

    method: ClassVar[str] = "kashin"
    SUPPORTED_BITS: ClassVar[tuple[int, ...]] = (2, 3, 4, 5, 6, 8)

    def __post_init__(self):
        super().__post_init__()
        for field_, value, choices in (("transform", self.transform, TRANSFORMS), ("form", self.form, FORMS),
                                       ("codebook", self.codebook, CODEBOOKS)):
            if value not in choices:
                raise LeanformerError(f"Kashin: unknown {field_} {value!r}; choose from {', '.join(choices)}")
        if self.form == "matrix" and (self.group_size is not None or self.codebook != "kmeans"):
            raise LeanformerError("Kashin: form='matrix' quantizes whole layers with a k-means codebook; "
                                  "use codebook='kmeans' and no group_size with it")
        if not 0 < self.tol < 1:
            raise LeanformerError(f"Kashin: tol must be in (0, 1), got {self.tol}")
        if self.step_sizes not in STEP_SIZES:
            raise LeanformerError(f"Kashin: unknown step_sizes {self.step_sizes!r}; choose from {', '.join(STEP_SIZES)}")

    def quantize_weight(self, weight: torch.Tensor, name: str):
        out_f, in_f = weight.shape
        # each layer gets its own seed so P differs between layers but is reproducible
        seed = (self.seed * 1_000_003 + sum(map(ord, name)) * 7919 + out_f * 31 + in_f) % (2 ** 62)
        if self.form == "matrix":
            return self._matrix(weight, name, seed)
        g = check_group_size(self.group_size, in_f, name)
        col = fp16(weight.pow(2).mean(0).sqrt().clamp_min(1e-8)) if self.col_scale else None
        if col is not None:
            # Input columns of very different size (features that carry outlier activations tend to have
            # them) get the same relative precision: the decomposition spreads error evenly over a row.
            weight = weight / col.float()
        x = weight.reshape(-1, g)
        # unit-RMS vectors: one tolerance and one codebook fit every row of the layer
        rms = (x.norm(dim=1, keepdim=True) / math.sqrt(g)).clamp_min(1e-12)
        P = Transform(self.transform, g, seed)
        u, v, rel, it = kashin_vectors(x / rms, P, self.tol, self.max_iter)
        if rel.max() >= self.tol:
            raise NotConverged(f"Kashin decomposition residual {rel.max().item():.2e} ≥ tol {self.tol:g} "
                               f"after {it} iterations")
        header = {"form": "vector", "codebook": self.codebook, "transform": self.transform, "group_size": g,
                  "iterations": it, "kashin_level": max(u.abs().max().item(), v.abs().max().item())}
        seed_t = torch.tensor([seed], dtype=torch.int64)
        extra = {"col_scale": col} if col is not None else {}
        if self.codebook == "closed":
            shared = self.step_sizes == "shared"
            xn = x / rms if shared else x  # shared steps fit unit-RMS rows; a per-row scale restores them
            signs, doms, coef = closed_form(xn, P, self.bits, self.sweeps, shared=shared)
            bitsw = (signs > 0).long()  # (k, rows, N): bit j of each weight's index = sign of step j
            idx = (bitsw << torch.arange(self.bits)[:, None, None]).sum(0)
            tensors = {"packed": pack_bits(idx, self.bits), "domains": pack_bits(doms.T.long(), 1),
                       "seed": seed_t, **extra}
            if shared:
                steps = fp16(coef[:1])
                cols = torch.where(doms[..., None], P.apply(signs), signs)          # (k, rows, g)
                xh = torch.einsum("krg,k->rg", cols, steps.float()[0])
                energy = (xh * xh).sum(1)
                scale = torch.where(energy > 0, (x * xh).sum(1) / energy.clamp_min(1e-30), rms[:, 0])
                tensors.update(steps=steps, scale=fp16(scale))
            else:
                tensors["steps"] = fp16(coef)
            header["step_sizes"] = self.step_sizes
            return tensors, header
        cent, lab = self._codebook(u, v, seed)
        c = cent.float()
        xh = c[lab, 0].view_as(x) + P.apply(c[lab, 1].view_as(x))
        # closed-form least-squares scale per vector for the quantized direction
        energy = (xh * xh).sum(1, keepdim=True)
        scale = torch.where(energy > 0, (x * xh).sum(1, keepdim=True) / energy.clamp_min(1e-30), rms)
        tensors = {"packed": pack_bits(lab, self.bits), "codebook": cent, "scale": fp16(scale.reshape(-1)),
                   "seed": seed_t, **extra}
        return tensors, header

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

    @staticmethod
    def dequantize(tensors: dict[str, torch.Tensor], header: dict) -> torch.Tensor:
        out_f, in_f = header["shape"]
        bits = header["bits"]
        seed = int(tensors["seed"][0])
        lab = unpack_bits(tensors["packed"], bits, out_f * in_f)
        if header["form"] == "matrix":
            c = tensors["codebook"].float()
            q1, q2 = (_matrix(header["transform"], n, s).to(c.device) for n, s in ((out_f, seed), (in_f, seed + 1)))
            xh = c[lab, 0].view(out_f, in_f) + q1 @ c[lab, 1].view(out_f, in_f) @ q2.T
            return xh * tensors["scale"].float()
        g = header["group_size"]
        col = tensors["col_scale"].float() if "col_scale" in tensors else 1.0
        P = Transform(header["transform"], g, seed)
        if header["codebook"] == "kmeans":
            c = tensors["codebook"].float()
            xh = c[lab, 0].view(-1, g) + P.apply(c[lab, 1].view(-1, g))
            return (xh * tensors["scale"].float()[:, None]).view(out_f, in_f) * col
        rows = out_f * in_f // g
        steps = tensors["steps"].float().expand(rows, -1)                        # (rows, k)
        if "scale" in tensors:  # shared step sizes, one scale per vector
            steps = steps * tensors["scale"].float()[:, None]
        doms = unpack_bits(tensors["domains"], 1, rows * bits).view(rows, bits).float()
        shifts = torch.arange(bits, device=lab.device)[:, None, None]
        signs = ((lab.view(rows, g)[None] >> shifts) & 1).float() * 2 - 1  # (k, rows, g)
        # Σ_j c_j s_j split by domain, so P is applied once: W = A + P B
        a = torch.einsum("krg,rk->rg", signs, steps * (1 - doms))
        b = torch.einsum("krg,rk->rg", signs, steps * doms)
        return (a + P.apply(b)).view(out_f, in_f) * col

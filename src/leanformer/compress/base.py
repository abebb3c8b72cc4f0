"""`quantize(model, config)`: the one verb for weight quantization, and what its methods share.

A method is a config dataclass (kashin.py, rtn.py, hqq.py) whose `quantize_weight(W, name)` returns
the tensors it stores (b-bit indices packed with `pack_bits`, plus codebooks / scales / zeros /
norms) and a JSON-able header, and a module-level `dequantize(tensors, header)` that rebuilds the
weight. `QuantizedLinear` keeps only those stored tensors and rebuilds its weight on each forward
(or once, with cache=True), so the model runs unchanged and the stored bytes are exactly what
`size_report` counts and what `save_quantized` writes.
"""
from __future__ import annotations

import importlib
import time
from dataclasses import asdict, dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LeanformerError

# method name -> module holding its config class and `dequantize`; a fixed table, so a saved
# header can only ever reach these functions.
METHODS = {"kashin": "leanformer.compress.kashin", "rtn": "leanformer.compress.rtn",
           "hqq": "leanformer.compress.hqq"}

# Linear layers that belong to task heads or pooling heads, not to the transformer body.
HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs", "cls", "pooler", "pre_classifier", "head")


class NotConverged(Exception):
    """A method could not represent this weight (the layer stays in full precision)."""


# --------------------------------------------------------------------------------------------
# Bit packing: b-bit indices, little-endian within each byte, no per-row padding.


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


# --------------------------------------------------------------------------------------------
# Config base


@dataclass
class QuantConfig:
    """Fields every method shares. targets: module names (or name suffixes) of the Linear layers to
    quantize; None = every Linear except embeddings and task / pooling heads."""

    bits: int = 4
    targets: list[str] | None = None
    cache: bool = False  # keep the rebuilt weight in memory (faster, costs full-precision memory)

    method: ClassVar[str] = ""
    SUPPORTED_BITS: ClassVar[tuple[int, ...]] = ()

    def __post_init__(self):
        if self.bits not in self.SUPPORTED_BITS:
            raise LeanformerError(f"{type(self).__name__}: bits={self.bits!r} is not supported; "
                                  f"supported: {', '.join(map(str, self.SUPPORTED_BITS))}")
        if isinstance(self.targets, str):
            self.targets = [self.targets]

    def to_dict(self) -> dict:
        return {"method": self.method, **asdict(self)}

    def quantize_weight(self, weight: torch.Tensor, name: str) -> tuple[dict[str, torch.Tensor], dict]:
        raise NotImplementedError


def check_group_size(group_size: int | None, width: int, name: str) -> int:
    """The group length for a layer of this input width (None = the whole row)."""
    if group_size is None:
        return width
    if group_size <= 0 or width % group_size:
        divisors = [d for d in range(1, width + 1) if width % d == 0]
        near = sorted(divisors, key=lambda d: abs(d - group_size))[:4]
        raise LeanformerError(f"group size {group_size} does not divide the input width {width} of layer "
                              f"{name}; nearest group sizes that do: {', '.join(map(str, sorted(near)))}")
    return group_size


def method_module(method: str):
    if method not in METHODS:
        raise LeanformerError(f"unknown quantization method {method!r}; known: {', '.join(METHODS)}")
    return importlib.import_module(METHODS[method])


# --------------------------------------------------------------------------------------------
# The module


class QuantizedLinear(nn.Module):
    """A Linear whose weight is stored quantized and rebuilt on the fly (exactly as saved)."""

    def __init__(self, in_features: int, out_features: int, header: dict, tensors: dict[str, torch.Tensor],
                 bias: torch.Tensor | None, cache: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.header = dict(header)
        self.method = header["method"]
        self._dequantize = method_module(self.method).dequantize
        self.tensor_names = sorted(tensors)
        for k, v in tensors.items():
            self.register_buffer(k, v)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        self.cache = cache
        self._cached: torch.Tensor | None = None

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in self.tensor_names}

    def dequantize(self) -> torch.Tensor:
        """The full (out, in) float32 weight this layer computes with."""
        if self._cached is not None:
            return self._cached
        w = self._dequantize(self.stored_tensors(), self.header)
        if self.cache:
            self._cached = w
        return w

    def _apply(self, fn, *args, **kwargs):  # .to(device) must not leave a stale cached weight behind
        self._cached = None
        return super()._apply(fn, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantize().to(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, method={self.method}, bits={self.header['bits']}"


# --------------------------------------------------------------------------------------------
# Target selection and the verb


def _is_head(name: str, module: nn.Module, model: nn.Module) -> bool:
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out_emb is not None and module is out_emb:
        return True
    return any(part in HEAD_NAMES for part in name.split("."))


def select_targets(model: nn.Module, targets: list[str] | None = None) -> list[str]:
    """Names of the Linear modules to quantize (see QuantConfig.targets)."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if targets is None:
        chosen = [n for n, m in linears if not _is_head(n, m, model)]
        if not chosen:
            raise LeanformerError(f"{type(model).__name__} has no Linear layers outside embeddings and heads "
                                  "to quantize; pass targets=[...] explicitly")
        return chosen
    chosen = [n for n, _ in linears if any(n == t or n.endswith("." + t) for t in targets)]
    if not chosen:
        suffixes = sorted({n.split(".")[-1] for n, _ in linears})
        two = sorted({".".join(n.split(".")[-2:]) for n, _ in linears})[:12]
        raise LeanformerError(f"targets {targets} match no Linear layer of {type(model).__name__}; "
                              f"its Linear names end with: {', '.join(suffixes)} (e.g. {', '.join(two)})")
    return chosen


@dataclass
class QuantizeReport:
    config: dict
    quantized: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # layer -> why it stays in full precision
    seconds: float = 0.0

    def __str__(self):
        s = f"{self.config['method']} {self.config['bits']}-bit: {len(self.quantized)} layers quantized in {self.seconds:.1f} s"
        if self.skipped:
            s += f"; {len(self.skipped)} kept in full precision: " + "; ".join(f"{k} ({v})" for k, v in self.skipped.items())
        return s


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


@torch.no_grad()
def quantize(model: nn.Module, config: QuantConfig, progress: bool = True) -> QuantizeReport:
    """Replace the target Linear layers of `model` (in place) by QuantizedLinear layers.

    Layers a method cannot represent (NotConverged) stay in full precision and are listed in the
    report's `skipped`; bad input (NaN/Inf weights, group sizes that do not divide a width) raises
    LeanformerError before the model is modified.
    """
    from tqdm.auto import tqdm

    if not isinstance(config, QuantConfig):
        raise LeanformerError(f"quantize() takes a quantization config (Kashin, RTN, HQQ), not {type(config).__name__}")
    names = select_targets(model, config.targets)
    modules = {n: model.get_submodule(n) for n in names}
    for n, m in modules.items():  # validate everything first so a bad layer never leaves a half-quantized model
        if not torch.isfinite(m.weight).all():
            bad = (~torch.isfinite(m.weight)).sum().item()
            raise LeanformerError(f"layer {n} has {bad} NaN/Inf weight entries; quantization needs finite weights")
        check_group_size(getattr(config, "group_size", None), m.in_features, n)
    report = QuantizeReport(config=config.to_dict())
    t0 = time.perf_counter()
    replacements = {}
    for n in tqdm(names, desc=f"quantize {config.method} {config.bits}-bit", disable=not progress, leave=False):
        m = modules[n]
        w = m.weight.detach().float().cpu()
        try:
            tensors, header = config.quantize_weight(w, n)
        except NotConverged as e:
            report.skipped[n] = str(e)
            continue
        header = {"method": config.method, "bits": config.bits, "shape": [m.out_features, m.in_features], **header}
        q = QuantizedLinear(m.in_features, m.out_features, header, tensors, m.bias, cache=config.cache)
        replacements[n] = q.to(m.weight.device)
        report.quantized.append(n)
    for n, q in replacements.items():
        _set_module(model, n, q)
    report.seconds = time.perf_counter() - t0
    model.leanformer_quant = {"config": config.to_dict(), "skipped": dict(report.skipped)}
    if report.skipped:
        import warnings

        warnings.warn(str(report), stacklevel=2)
    return report


def relative_weight_errors(original: nn.Module, quantized: nn.Module) -> dict[str, float]:
    """‖W − Ŵ‖_F / ‖W‖_F for every QuantizedLinear of `quantized` against the same-named Linear of `original`."""
    out = {}
    for n, m in quantized.named_modules():
        if isinstance(m, QuantizedLinear):
            w = original.get_submodule(n).weight.detach().float().cpu()
            out[n] = ((w - m.dequantize().cpu()).norm() / w.norm().clamp_min(1e-30)).item()
    return out


def kmeans(points: torch.Tensor, k: int, iters: int = 30, sample: int = 200_000, seed: int = 0,
           chunk: int = 65_536) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic Lloyd k-means (k-means++ init on a subsample). Returns (centroids (k, d), labels (n,))."""
    g = torch.Generator().manual_seed(seed)
    n = points.shape[0]
    sub = points[torch.randperm(n, generator=g)[:sample]] if n > sample else points
    # k-means++ seeding on at most 20k points keeps init cheap and deterministic
    seed_pts = sub[:20_000]
    cent = seed_pts[torch.randint(len(seed_pts), (1,), generator=g)]
    d2 = ((seed_pts - cent) ** 2).sum(1)
    for _ in range(1, k):
        probs = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1 / len(d2))
        c = seed_pts[torch.multinomial(probs, 1, generator=g)]
        cent = torch.cat([cent, c])
        d2 = torch.minimum(d2, ((seed_pts - c) ** 2).sum(1))
    for _ in range(iters):
        lab = _assign(sub, cent, chunk)
        sums = torch.zeros_like(cent).index_add_(0, lab, sub)
        counts = torch.bincount(lab, minlength=k).to(sub.dtype)
        new = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], cent)
        if torch.allclose(new, cent, atol=1e-7, rtol=0):
            cent = new
            break
        cent = new
    return cent, _assign(points, cent, chunk)


def _assign(points: torch.Tensor, cent: torch.Tensor, chunk: int) -> torch.Tensor:
    c2 = (cent ** 2).sum(1)
    out = torch.empty(points.shape[0], dtype=torch.int64)
    for i in range(0, points.shape[0], chunk):
        p = points[i:i + chunk]
        out[i:i + chunk] = (c2[None, :] - 2 * p @ cent.T).argmin(1)
    return out


def fp16(t: torch.Tensor) -> torch.Tensor:
    """Metadata is stored in float16; methods compute with the rounded value so reload is exact."""
    return t.to(torch.float16)


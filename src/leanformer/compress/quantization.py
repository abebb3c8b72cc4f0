"""`quantize(model, config)`: the one verb for weight quantization, and what its methods share.

A method is a config dataclass (kashin.py, rtn.py, hqq.py, gptq.py) subclassing `QuantConfig`, with
`quantize_weight(W, name)` (a CALIBRATED one: `quantize_weight(W, name, XᵀX)`) returning the tensors
it stores (b-bit codes packed with `pack_bits`, plus codebooks / scales / zeros / norms) and a
JSON-able header, and `dequantize(tensors, header)`
rebuilding the weight. Subclassing registers the method by its name, so a saved header can only
reach these classes. `QuantizedLinear` keeps only the stored tensors: the model runs unchanged, and the
stored bytes are exactly what `size_report` counts and what `lf.save` writes. Its forward (`kernel`)
multiplies with the codes in a fused CPU kernel where the method has one (`native_linear`, lowbit.cpp),
else rebuilds the weight on each call (or once, with cache=True).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import time
import types
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..errors import LeanformerError
from . import native
from .packing import (SCALE_BITS, codes_from_runtime, fp16, log8_decode, pack_bits, packed_nbytes, runtime_codes,
                      runtime_nbytes, unpack_codes)
from ..stack import Applied, push, record_base
from ..targets import (WRAPPER_TYPES, FilterFn, Targets, dense_weight, linear_shape, register_linear_type,
                       select_linear, set_module)

METHODS: dict[str, type["QuantConfig"]] = {}  # method name → config class (filled by subclassing)
KERNELS = ("native", "decode", "compiled")
# kernel="native": up to this many tokens per call the fused kernel reads the codes once per token; above, one matmul
# against the rebuilt weight is cheaper (RTN/HQQ; benchmarks/route_crossover.py: the two tie at about 4 tokens on
# MiniLM's and stories260K's layers, and at 8 the rebuilt weight takes 0.3-0.6x the time)
NATIVE_MAX_TOKENS = 3
PLAN_TYPES: list[type] = []  # per-layer plans quantize() applies (plan.py registers QuantPlan; it imports this module)


class NotConverged(Exception):
    """A method could not represent this weight (the layer stays in full precision)."""


@dataclass
class QuantConfig:
    """Fields every method shares (each field's help is in its metadata)."""

    bits: int = field(default=4, metadata={"help": "index bits per weight (metadata is counted on top)"})
    targets: Targets = field(default=None, metadata={
        "help": "which Linear layers: module names or name suffixes, one regex, or all-linear "
                "(none = every Linear except embeddings and heads)"})
    cache: bool = field(default=False, metadata={
        "help": "keep each rebuilt weight in memory (faster forward, costs full-precision memory)"})
    kernel: str = field(default="native", metadata={
        "help": "how a forward computes: native (CPU, float32, inference: fused C++ kernels that multiply with the "
                "codes and never build the weight for calls of up to 8 tokens, and rebuild it in one pass for more; "
                "built on first use with the system C++ compiler; elsewhere, or where they cannot be built, a warning "
                "and decode), decode (plain torch ops, any device, differentiable) or compiled (torch.compile of the "
                "same decode: a C++ compiler on CPU, Triton on CUDA; where that fails or disagrees with decode, a "
                "warning and decode)", "choices": KERNELS})
    filter_fn: FilterFn | None = field(default=None, repr=False, compare=False, metadata={
        "help": "filter_fn(module, name) -> bool keeps only the layers it accepts", "cli": False, "saved": False})

    method: ClassVar[str] = ""
    SUPPORTED_BITS: ClassVar[tuple[int, ...]] = ()
    # a calibrated method's quantize_weight also takes the Gram matrix XᵀX of the layer's inputs (GPTQ); quantize()
    # measures it on the config's calibration input, lf.plan hands over its own
    CALIBRATED: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.method:
            METHODS[cls.method] = cls

    def __post_init__(self):
        if self.bits not in self.SUPPORTED_BITS:
            raise LeanformerError(f"{type(self).__name__}: bits={self.bits!r} is not supported; "
                                  f"supported: {', '.join(map(str, self.SUPPORTED_BITS))}")
        if isinstance(self.targets, tuple):
            self.targets = list(self.targets)
        if self.kernel not in KERNELS:
            raise LeanformerError(f"{type(self).__name__}: unknown kernel {self.kernel!r}; choose from {', '.join(KERNELS)}")

    def to_dict(self) -> dict:
        """JSON form, without the fields marked saved=False (filter_fn is code, a calibration set is input:
        neither is saved; the chosen layers and the stored tensors are)."""
        d = {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self)
             if f.metadata.get("saved", True)}
        return {"method": self.method, **d}

    @staticmethod
    def from_dict(d: dict) -> "QuantConfig":
        d = dict(d)
        cls = method_class(d.pop("method", None))
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def quantize_weight(self, weight: torch.Tensor, name: str) -> tuple[dict[str, torch.Tensor], dict]:
        """(stored tensors, the method's header keys) for this (out, in) float32 weight; a CALIBRATED method
        takes a third argument, the (in, in) Gram matrix of the layer's calibration inputs."""
        raise NotImplementedError

    def stored_form(self, weight: torch.Tensor, name: str,
                    gram: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], dict]:
        """What a layer stores for this (out, in) float32 weight: the method's tensors and the full header
        (method, bits, shape, then the method's own keys), as saved and as `dequantize` reads it. `gram`
        (XᵀX of the layer's inputs) is read by calibrated methods only."""
        if self.CALIBRATED:
            if gram is None:
                raise LeanformerError(f"{type(self).__name__} needs the Gram matrix of layer {name}'s inputs")
            tensors, header = self.quantize_weight(weight, name, gram)
        else:
            tensors, header = self.quantize_weight(weight, name)
        return tensors, {"method": self.method, "bits": self.bits, "shape": list(weight.shape), **header}

    @classmethod
    def runtime_tensors(cls, tensors: dict[str, torch.Tensor], header: dict) -> dict[str, torch.Tensor]:
        """What decode, linear and native_linear read, from the stored tensors besides the codes: those tensors
        themselves, unless the method stores some in a coded form that a forward would otherwise expand on every
        call (a layer computes this once). Its own tensors: sharing storage with them is fine."""
        return tensors

    @staticmethod
    def decode(codes: torch.Tensor, tensors: dict[str, torch.Tensor], header: dict) -> torch.Tensor:
        """The (out, in) float32 weight from the n uint8 codes (row-major) and the other tensors (as
        `runtime_tensors` gives them); it runs on every forward, so it is vectorised over the whole layer."""
        raise NotImplementedError

    @classmethod
    def linear(cls, x: torch.Tensor, codes: torch.Tensor, tensors: dict[str, torch.Tensor], header: dict,
               bias: torch.Tensor | None) -> torch.Tensor:
        """y = x Ŵᵀ + b from the stored form. The default rebuilds Ŵ (decode) and multiplies; a method
        whose structure allows cheaper work for some inputs (e.g. few tokens) overrides it."""
        return F.linear(x, cls.decode(codes, tensors, header).to(x.dtype), bias)

    @classmethod
    def native_linear(cls, ops, codes: torch.Tensor, tensors: dict[str, torch.Tensor], header: dict,
                      bias: torch.Tensor | None) -> Callable[[torch.Tensor], torch.Tensor | None] | None:
        """The fused kernels `ops` (native.py) bound to one layer's in-memory codes (`packing.runtime_codes`)
        and stored tensors: a function of a float32 CPU input x (…, in) returning y = x Ŵᵀ + b (…, out), or
        None for an input it leaves to `linear`; None where the method has no kernel for this layer. A layer
        binds it once, so it may hold what every call needs (column scales in float32, a transform's matrix)."""
        return None

    @classmethod
    def dequantize(cls, tensors: dict[str, torch.Tensor], header: dict) -> torch.Tensor:
        """The weight from exactly what is stored (the packed code stream included)."""
        out_f, in_f = header["shape"]
        codes = unpack_codes(tensors["packed"], header["bits"], out_f * in_f)
        return cls.decode(codes, cls.runtime_tensors({k: v for k, v in tensors.items() if k != "packed"}, header),
                          header)


@dataclass
class AffineQuantConfig(QuantConfig):
    """What RTN, HQQ and GPTQ share: b-bit codes with a scale s and a zero per group of `group_size` inputs
    of a row (and optional column scales). The zero is either an offset m, Ŵ = s q + m (RTN's and GPTQ's
    float16 minimum), or a point z in code units, Ŵ = s (q − z) (HQQ's float16 zero, ZERO_IN_CODES; RTN's
    and GPTQ's integer zero point, header zero_point="integer", packed at `bits` bits). A scale is float16,
    or an 8-bit log code in the layer's `log_range` (scale_bits=8)."""

    ZERO_IN_CODES: ClassVar[bool] = False

    @classmethod
    def runtime_tensors(cls, tensors: dict[str, torch.Tensor], header: dict) -> dict[str, torch.Tensor]:
        """The stored grid as float16 scale and zero per group (8-bit log-coded scales decoded, integer zero
        points unpacked), as decode and the fused kernels read it."""
        if "log_range" not in tensors and header.get("zero_point") != "integer":
            return tensors
        out = {k: v for k, v in tensors.items() if k != "log_range"}
        if "log_range" in tensors:
            out["scale"] = fp16(log8_decode(tensors["scale"], tensors["log_range"]))
        if header.get("zero_point") == "integer":
            out["zero"] = unpack_codes(tensors["zero"], header["bits"], out["scale"].numel()).to(torch.float16)
        return out

    @classmethod
    def zero_in_codes(cls, header: dict) -> bool:
        return cls.ZERO_IN_CODES or header.get("zero_point") == "integer"

    @classmethod
    def decode(cls, codes: torch.Tensor, tensors: dict[str, torch.Tensor], header: dict) -> torch.Tensor:
        out_f, in_f = header["shape"]
        w = codes.view(-1, header["group_size"]).float()  # in place from here: this runs on every forward
        scale, zero = tensors["scale"].float()[:, None], tensors["zero"].float()[:, None]
        w = w.sub_(zero).mul_(scale) if cls.zero_in_codes(header) else w.mul_(scale).add_(zero)
        w = w.view(out_f, in_f)
        return w.mul_(tensors["col_scale"].float()) if "col_scale" in tensors else w

    @classmethod
    def native_linear(cls, ops, codes, tensors, header, bias):
        """Up to NATIVE_MAX_TOKENS tokens the kernel multiplies with the codes (per group s Σ q x + m Σ x, with
        m = zero, or −zero·s for a zero in code units); above, it rebuilds the weight in one pass and multiplies."""
        scale, zero = tensors["scale"], tensors["zero"]
        if scale.dtype != torch.float16 or zero.dtype != torch.float16:  # metadata cast away from how it is stored
            return None
        col = tensors["col_scale"].float() if "col_scale" in tensors else None
        out_f, in_f = header["shape"]
        return ops.AffineLayer(codes, scale, zero, col, bias, out_f, in_f, header["group_size"], header["bits"],
                               cls.zero_in_codes(header), NATIVE_MAX_TOKENS)


def method_class(method: str) -> type[QuantConfig]:
    if method not in METHODS:
        raise LeanformerError(f"unknown quantization method {method!r}; known: {', '.join(sorted(METHODS))}")
    return METHODS[method]


def group_size_field(default: int | None):
    """The `group_size` field of a method: one help text, each method's own default."""
    return field(default=default, metadata={
        "help": "weights per group (Kashin: per vector); must divide each layer's input width "
                "(none = one group per row)"})


def scale_bits_field():
    """The `scale_bits` field (Kashin's, RTN's, GPTQ's): one help text."""
    return field(default=16, metadata={
        "help": "bits of each stored scale (RTN, GPTQ: per group; Kashin's closed codebook: the per-vector step "
                "sizes, or with shared step_sizes the scale): 16 (float16) or 8 (log-coded between the layer's "
                "smallest and largest, 8 bytes per layer; halves that metadata, for 2-4-bit weights on short rows)",
        "choices": SCALE_BITS})


def check_group_size(group_size: int | None, width: int, name: str) -> int:
    """The group length for a layer of this input width (None = the whole row)."""
    if group_size is None:
        return width
    if group_size <= 0 or width % group_size:
        raise LeanformerError(f"group size {group_size} does not divide the input width {width} of layer "
                              f"{name}; nearest group sizes that do: "
                              f"{', '.join(map(str, nearest_divisors(width, group_size)))}")
    return group_size


def column_rms(weight: torch.Tensor) -> torch.Tensor:
    """col_scale's stored tensor: each input column's RMS in float16 (clamped into float16's normal
    range, so an all-zero column divides by a finite, non-zero value)."""
    return fp16(weight.pow(2).mean(0).sqrt().clamp(2.0 ** -14, 65504.0))


def col_scale_field(default: bool):
    """The `col_scale` field (Kashin's, and offered to RTN / HQQ): one help text, each method's default."""
    return field(default=default, metadata={
        "help": "divide the input columns by their RMS before quantizing (one fp16 per input column, stored, "
                "multiplied back when the weight is rebuilt; Kashin: vector form only)"})


def nearest_divisors(n: int, target: int, count: int = 4) -> list[int]:
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    return sorted(sorted(divisors, key=lambda d: abs(d - target))[:count])


_SPECS_ONLY = [False]


@contextlib.contextmanager
def state_dict_specs_only():
    """Inside this block a QuantizedLinear's state_dict entry for its code stream is a meta tensor of the
    stored shape and dtype instead of the packed bytes: listing what a load must provide packs nothing."""
    _SPECS_ONLY[0] = True
    try:
        yield
    finally:
        _SPECS_ONLY[0] = False


@register_linear_type
class QuantizedLinear(nn.Module):
    """A Linear whose weight is stored quantized (exactly as saved). It replaces nn.Linear and Conv1D
    alike: the stored weight is (out, in) whatever the original's layout, and the output, y = x Wᵀ + b,
    is the same.

    In memory the codes are held in `packing.runtime_codes`' byte layout (two per byte up to 4 bits): the
    native kernels read them as they are (float32 CPU inference), and the decode path (gradients, other
    dtypes and devices, methods without a kernel) rebuilds the weight with byte operations and one fused
    multiply-add per weight. The b-bit stream that is saved and counted (`packed`) is produced on the way
    out (state_dict) and read on the way in (load_state_dict). The full-precision weight exists only
    inside a decode-path forward, one layer at a time (or for good, with cache=True)."""

    def __init__(self, in_features: int, out_features: int, header: dict, tensors: dict[str, torch.Tensor],
                 bias: torch.Tensor | None, cache: bool = False, kernel: str = "native"):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.header = dict(header)
        self.method = header["method"]
        self.bits = int(header["bits"])
        self._method = method_class(self.method)
        tensors = dict(tensors)
        packed = tensors.pop("packed")  # None: all-zero codes (a replayed structure, filled by the load)
        self.tensor_names = sorted(tensors)  # the stored tensors besides the packed codes
        for k, v in tensors.items():
            self.register_buffer(k, v)
        codes = (torch.zeros(runtime_nbytes(self.n_weights, self.bits), dtype=torch.uint8) if packed is None else
                 runtime_codes(unpack_codes(packed, self.bits, self.n_weights), self.bits))
        self.register_buffer("codes", codes, persistent=False)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        self._cached: torch.Tensor | None = None
        self._native_fn = None  # kernel="native": the method's kernels bound to this layer (False: none here)
        self._runtime: dict[str, torch.Tensor] | None = None  # runtime_tensors(), computed on first use
        self.cache, self.kernel = cache, kernel
        self._kernel_checked = False

    @property
    def n_weights(self) -> int:
        return self.in_features * self.out_features

    def index_codes(self) -> torch.Tensor:
        """The n uint8 codes, row-major over the (out, in) weight."""
        return codes_from_runtime(self.codes, self.bits, self.n_weights)

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor a save writes for this layer, the packed b-bit code stream included."""
        return {"packed": pack_bits(self.index_codes(), self.bits), **self.metadata_tensors()}

    def metadata_tensors(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in self.tensor_names}

    def runtime_tensors(self) -> dict[str, torch.Tensor]:
        """The method's runtime_tensors of this layer, computed once (again after a load or a move)."""
        if self._runtime is None:
            self._runtime = self._method.runtime_tensors(self.metadata_tensors(), self.header)
        return self._runtime

    def tensor_specs(self) -> dict[str, list]:
        """{name: [dtype, shape]} of every stored tensor: what a saved header promises."""
        specs = {k: [str(v.dtype).removeprefix("torch."), list(v.shape)] for k, v in self.metadata_tensors().items()}
        return {"packed": ["uint8", [packed_nbytes(self.n_weights, self.bits)]], **specs}

    def stored_nbytes(self) -> dict[str, int]:
        """Bytes of each stored tensor (what size_report counts), without packing anything."""
        return {"packed": packed_nbytes(self.n_weights, self.bits),
                **{k: v.numel() * v.element_size() for k, v in self.metadata_tensors().items()}}

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "packed"] = (
            torch.empty(packed_nbytes(self.n_weights, self.bits), dtype=torch.uint8, device="meta")
            if _SPECS_ONLY[0] else pack_bits(self.index_codes(), self.bits))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        self._runtime = None  # it and the kernel binding read the stored tensors this load overwrites
        self._unbind()
        key = prefix + "packed"
        if key in state_dict:
            packed = state_dict.pop(key)
            need = packed_nbytes(self.n_weights, self.bits)
            if packed.dtype != torch.uint8 or packed.numel() != need:
                error_msgs.append(f"{key}: {packed.numel()} {str(packed.dtype).removeprefix('torch.')} values stored, "
                                  f"but {self.out_features}x{self.in_features} codes of {self.bits} bits need {need} "
                                  "uint8 bytes")
            else:
                self.codes = runtime_codes(unpack_codes(packed, self.bits, self.n_weights),
                                           self.bits).to(self.codes.device)
                self._cached = None
        elif strict:
            missing_keys.append(key)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def dequantize(self) -> torch.Tensor:
        """The full (out, in) float32 weight this layer computes with."""
        if self._cached is not None:
            return self._cached
        w = self._weight()
        if self.cache:
            self._cached = w
        return w

    @property
    def cache(self) -> bool:
        return self._cache

    @cache.setter
    def cache(self, on: bool) -> None:
        """Switching the cache (either way) drops any kept weight: the next forward rebuilds it."""
        self._cache, self._cached = bool(on), None
        self._unbind()

    @property
    def kernel(self) -> str:
        return self._kernel

    @kernel.setter
    def kernel(self, name: str) -> None:
        if name not in KERNELS:
            raise LeanformerError(f"unknown kernel {name!r}; choose from {', '.join(KERNELS)}")
        self._kernel = name
        self._unbind()

    def _weight(self) -> torch.Tensor:
        args = (self.index_codes(), self.runtime_tensors(), self.header)
        if self.kernel == "compiled":
            w = _compiled_weight(self, args)
            if w is not None:
                return w
        return self._method.decode(*args)

    @property
    def weight(self) -> torch.Tensor:
        """The rebuilt weight, for modelling code that reads a projection's `.weight` (T5 reads its dtype
        every forward); not a parameter, and rebuilt on each read unless cache=True."""
        return self.dequantize()

    def __getstate__(self):  # a copy or pickle rebinds its kernel on first use: a bound kernel (C++) is not copyable
        state = super().__getstate__()
        if self._native_fn and state.get("forward") is self._native_fn:  # (not a forward someone else set)
            del state["forward"]
        return {**state, "_native_fn": None}

    def _apply(self, fn, *args, **kwargs):  # .to(device) must not leave a stale weight, kernel binding or grid behind
        self._cached = self._runtime = None
        self._unbind()
        return super()._apply(fn, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        run = self._native_fn if self._native_fn is not None else self._bind_native()
        if run and x.is_cpu and x.dtype == torch.float32 and not (x.requires_grad and torch.is_grad_enabled()):
            y = run(x)
            if y is not None:
                return y
        return self._forward_without_kernel(x)

    def _forward_without_kernel(self, x: torch.Tensor) -> torch.Tensor:
        if self._kernel == "native" and not x.is_cpu:
            _warn_once(f"kernel='native' runs on the CPU; {x.device.type} inputs use kernel='decode'")
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.cache or self._cached is not None or self.kernel == "compiled":
            return F.linear(x, self.dequantize().to(x.dtype), bias)
        return self._method.linear(x, self.index_codes(), self.runtime_tensors(), self.header, bias)

    def _bind_native(self):
        """kernel="native" without the weight cache: the method's fused kernels bound to this layer (a function
        of x returning y, or None for an input it leaves to the other paths); else, or where there are none
        (no kernel for this method or layout, kernels that cannot be built here: native.ops warns once), False."""
        ops = native.ops() if self._kernel == "native" and not self._cache and self.codes.is_cpu else None
        run = ops is not None and self._method.native_linear(ops, self.codes, self.runtime_tensors(), self.header,
                                                             self.bias)
        self._native_fn = run or False
        if run and hasattr(run, "bind_module"):
            # the kernel object (lowbit.cpp ModuleHandle) takes the inputs forward would give it and sends the others
            # to the path without kernels; as the module's own forward it saves a Python call per layer call (a
            # decode step makes one per layer). Not where something else (accelerate's hooks) already set forward.
            run.bind_module(weakref.WeakMethod(types.MethodType(QuantizedLinear.forward, self)),
                            weakref.WeakMethod(self._forward_without_kernel))
            if "forward" not in self.__dict__:
                self.forward = run
        return self._native_fn

    def _unbind(self) -> None:
        """Drop the kernel binding (the next forward binds afresh); a binding someone kept hands every call to forward."""
        run = self.__dict__.get("_native_fn")
        if run and hasattr(run, "detach"):
            run.detach()
        if run and self.__dict__.get("forward") is run:
            del self.forward
        self._native_fn = None

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, method={self.method}, bits={self.bits}"


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, stacklevel=3)


_COMPILED: dict[type, object] = {}  # method class → its compiled decode (compiled once per weight shape)


def _compiled_weight(layer: QuantizedLinear, args: tuple) -> torch.Tensor | None:
    """The weight from the compiled decode, checked against the plain decode on the layer's first call;
    None, with a warning, where compiling is not possible here or its result differs (never a wrong weight)."""
    try:
        if layer._method not in _COMPILED:
            _COMPILED[layer._method] = torch.compile(layer._method.decode, dynamic=False)
        w = _COMPILED[layer._method](*args)
        if not layer._kernel_checked:
            ref = layer._method.decode(*args)
            if w.shape != ref.shape or not torch.allclose(w, ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max())):
                raise ValueError(f"its weight differs from decode's by up to {float((w - ref).abs().max()):.3g}")
            layer._kernel_checked = True
        return w
    except Exception as e:  # noqa: BLE001 — compiler back ends fail in many ways; each one means "use decode"
        warnings.warn(f"{layer.method} layer ({layer.out_features}x{layer.in_features}): kernel='compiled' is not "
                      f"usable on this {args[0].device.type} machine ({type(e).__name__}: {str(e)[:200]}); "
                      "falling back to kernel='decode'", stacklevel=3)
        layer.kernel = "decode"
        return None


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


def _linear_to_quantize(model: nn.Module, name: str) -> tuple[str, nn.Module]:
    """(path, module) of the Linear to replace: a wrapper's base layer stands in for the wrapper."""
    module = model.get_submodule(name)
    if isinstance(module, tuple(WRAPPER_TYPES)):
        name, module = f"{name}.base_layer", module.base_layer
    if isinstance(module, QuantizedLinear):
        raise LeanformerError(f"layer {name} is already quantized ({module.method}, {module.header['bits']} bits)")
    return name, module


@torch.no_grad()
def quantize(model: nn.Module, config: QuantConfig, progress: bool = True, *,
             grams: dict[str, torch.Tensor] | None = None) -> QuantizeReport:
    """Replace the target Linear layers of `model` (in place) by QuantizedLinear layers.

    Layers a method cannot represent (NotConverged) stay in full precision and are listed in the
    report's `skipped`; bad input (NaN/Inf weights, group sizes that do not divide a width) raises
    LeanformerError before the model is modified. A QuantPlan (lf.plan) applies as one quantize per
    config on exactly its layers, and returns their reports as a list. A calibrated method (GPTQ)
    reads the Gram matrix of each layer's inputs from `grams` (layer name → XᵀX) where given, else
    measures them on its config's calibration input (its `stages`); if anything fails midway, every
    layer already replaced is put back.
    """
    if isinstance(config, tuple(PLAN_TYPES)):
        return config.apply(model, progress=progress)
    if not isinstance(config, QuantConfig):
        raise LeanformerError(f"quantize() takes a quantization config (Kashin, RTN, HQQ, GPTQ) or a QuantPlan (lf.plan), "
                              f"not {type(config).__name__}")
    names = select_linear(model, config.targets, config.filter_fn)
    modules = dict(_linear_to_quantize(model, n) for n in names)
    for n, m in modules.items():  # validate everything first so a bad layer never leaves a half-quantized model
        weight = dense_weight(m)
        if not torch.isfinite(weight).all():
            bad = (~torch.isfinite(weight)).sum().item()
            raise LeanformerError(f"layer {n} has {bad} NaN/Inf weight entries; quantization needs finite weights")
        check_group_size(getattr(config, "group_size", None), linear_shape(m)[0], n)
    t0 = time.perf_counter()
    # stages of layers with the Gram matrices of their inputs: a calibrated method measures each stage on the model
    # as quantized so far (its iterator resumes after the previous stage is swapped in)
    stages = config.stages(model, modules, grams or {}, progress) if config.CALIBRATED else [(list(modules), {})]
    record_base(model)
    report = QuantizeReport(config=config.to_dict())
    replacements, originals = {}, {}
    bar = tqdm(total=len(modules), desc=f"quantize {config.method} {config.bits}-bit", disable=not progress,
               leave=False)
    try:
        for stage, stage_grams in stages:
            for n in stage:
                m = modules[n]
                w = dense_weight(m).detach().float().cpu().contiguous()  # (out, in), also for a Conv1D
                bar.update()
                try:
                    tensors, header = config.stored_form(w, n, stage_grams.get(n))
                except NotConverged as e:
                    report.skipped[n] = str(e)
                    continue
                in_f, out_f = linear_shape(m)
                q = QuantizedLinear(in_f, out_f, header, tensors, m.bias, cache=config.cache, kernel=config.kernel)
                replacements[n] = q.to(m.weight.device)
                originals[n] = m
                set_module(model, n, replacements[n])
                report.quantized.append(n)
    except BaseException:  # nothing half-done: every layer swapped so far goes back
        for n, m in originals.items():
            set_module(model, n, m)
        raise
    finally:
        bar.close()
    report.seconds = time.perf_counter() - t0
    push(model, Applied("quantize", config, {
        "layers": {n: {**q.header, "tensors": q.tensor_specs()} for n, q in replacements.items()},
        "skipped": dict(report.skipped)}))
    if report.skipped:
        warnings.warn(str(report), stacklevel=2)
    return report


def replay(model: nn.Module, config: dict, state: dict) -> None:
    """Rebuild a recorded quantization's structure (empty stored tensors, filled by the state dict load)."""
    cache, kernel = bool(config.get("cache", False)), config.get("kernel", "decode")
    for name, h in state["layers"].items():
        method_class(h["method"])  # unknown methods fail with the list of known ones
        out_f, in_f = h["shape"]
        packed = h["tensors"].get("packed", [None, [0]])[1]
        if packed != [packed_nbytes(out_f * in_f, h["bits"])]:
            raise LeanformerError(f"quantized layer {name}: its header promises {packed} packed bytes, but "
                                  f"{out_f}x{in_f} weights at {h['bits']} bits need {packed_nbytes(out_f * in_f, h['bits'])}; "
                                  "the checkpoint is corrupt")
        old = model.get_submodule(name)
        # zeros, not empty: a transform replayed on top (LoRA-XS takes an SVD of the weight) must see finite
        # values before the state dict load overwrites them
        tensors = {k: torch.zeros(shape, dtype=getattr(torch, dtype)) for k, (dtype, shape) in h["tensors"].items()
                   if k != "packed"}
        tensors["packed"] = None  # all-zero codes, without unpacking a stream of zeros
        header = {k: v for k, v in h.items() if k != "tensors"}
        set_module(model, name, QuantizedLinear(*linear_shape(old), header, tensors, old.bias, cache, kernel))
    push(model, Applied("quantize", QuantConfig.from_dict(config), state))


def quantized_layers(model: nn.Module) -> dict[str, QuantizedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def relative_weight_errors(original: nn.Module, quantized: nn.Module) -> dict[str, float]:
    """‖W − Ŵ‖_F / ‖W‖_F for every QuantizedLinear of `quantized` against the same-named Linear of `original`."""
    out = {}
    for n, m in quantized_layers(quantized).items():
        w = dense_weight(original.get_submodule(n)).detach().float().cpu()
        out[n] = ((w - m.dequantize().cpu()).norm() / w.norm().clamp_min(1e-30)).item()
    return out

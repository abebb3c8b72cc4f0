"""kernel="native": the fused low-bit CPU kernels (compress/lowbit.cpp) against the plain-torch decode path
of each method and layout, the routes around them (gradients, other dtypes, devices, many tokens), and the
fallback where they cannot be built."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import leanformer as lf
from leanformer.compress import kashin, native
from leanformer.compress.kashin import (ACTIVATION_DENSE_MAX, ACTIVATION_ROUTE_TOKENS, DENSE_TRANSFORM_MAX,
                                       TABLE_KERNEL_TOKENS, TABLE_ONLY_TOKENS)
from leanformer.compress.quantization import NATIVE_MAX_TOKENS, QuantizedLinear, quantized_layers
from leanformer.errors import LeanformerError

from test_kashin_gptq import layer_of

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def quantized(config, out_f: int, in_f: int, bias: bool = True, seed: int = 0) -> QuantizedLinear:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(in_f, out_f, bias=bias))
    report = lf.quantize(net, config, progress=False)
    assert report.quantized == ["0"], report.skipped
    return net[0]


def outputs(layer: QuantizedLinear, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(native, decode) outputs of the same layer on x, without gradients."""
    with torch.no_grad():
        layer.kernel = "decode"
        ref = layer(x)
        layer.kernel = "native"
        return layer(x), ref


def assert_close(y: torch.Tensor, ref: torch.Tensor) -> None:
    assert y.shape == ref.shape and y.dtype == ref.dtype
    err = float((y - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
    assert err < 1e-5, err


AFFINE = [
    pytest.param(lambda: lf.RTN(bits=3, group_size=16), 48, 64, id="rtn3-g16"),
    pytest.param(lambda: lf.RTN(bits=4, group_size=64), 20, 128, id="rtn4-g64"),
    pytest.param(lambda: lf.RTN(bits=2, group_size=None), 9, 40, id="rtn2-row"),
    pytest.param(lambda: lf.RTN(bits=3, group_size=None), 6, 7, id="rtn3-odd-width"),
    pytest.param(lambda: lf.RTN(bits=3, group_size=None, col_scale=True), 17, 45, id="rtn3-odd-col"),
    pytest.param(lambda: lf.RTN(bits=5, group_size=16), 12, 48, id="rtn5-bytes"),
    pytest.param(lambda: lf.RTN(bits=8, group_size=None), 5, 33, id="rtn8-bytes-odd"),
    pytest.param(lambda: lf.RTN(bits=3, group_size=16, scale_bits=8, zero_point="integer"), 24, 64, id="rtn3-compact"),
    pytest.param(lambda: lf.RTN(bits=2, group_size=None, zero_point="integer", clip=True), 9, 45, id="rtn2-int-odd"),
    pytest.param(lambda: lf.HQQ(bits=3, group_size=32), 40, 96, id="hqq3-g32"),
    pytest.param(lambda: lf.HQQ(bits=4, group_size=16, col_scale=True), 24, 48, id="hqq4-g16-col"),
    pytest.param(lambda: lf.HQQ(bits=1, group_size=None), 8, 24, id="hqq1-row"),
]
KASHIN = [
    pytest.param(lambda: lf.Kashin(bits=3), 48, 64, id="row"),
    pytest.param(lambda: lf.Kashin(bits=2, group_size=32), 24, 96, id="g32"),
    pytest.param(lambda: lf.Kashin(bits=4, col_scale=False), 20, 40, id="4bit-nocol"),
    pytest.param(lambda: lf.Kashin(bits=3, rows_per_vector=2), 16, 40, id="two-rows"),
    pytest.param(lambda: lf.Kashin(bits=3, scale_bits=8), 32, 64, id="log8-steps"),
    pytest.param(lambda: lf.Kashin(bits=3, step_sizes="shared"), 32, 64, id="shared"),
    pytest.param(lambda: lf.Kashin(bits=3, step_sizes="shared", scale_bits=8), 32, 64, id="shared-log8"),
    pytest.param(lambda: lf.Kashin(bits=3, layout="auto"), 32, 48, id="auto"),
    pytest.param(lambda: lf.Kashin(bits=5), 16, 32, id="5bit-bytes"),
    pytest.param(lambda: lf.Kashin(bits=3), 6, 7, id="odd-width"),
    pytest.param(lambda: lf.Kashin(bits=3), 7, 64, id="odd-rows"),  # rows go in pairs: the last one alone
    pytest.param(lambda: lf.Kashin(bits=3, transform="random"), 16, 48, id="random-P"),
    # longer than DENSE_TRANSFORM_MAX: the weight route applies P by FFT, the activation route as a dense matrix
    pytest.param(lambda: lf.Kashin(bits=3), 8, 300, id="dense-P-activations"),
    # longer than ACTIVATION_DENSE_MAX: P by FFT on both routes
    pytest.param(lambda: lf.Kashin(bits=3), 4, 520, id="fft-P"),
    pytest.param(lambda: lf.Kashin(bits=4, col_scale=False), 6, 528, id="fft-P-4bit"),
    pytest.param(lambda: lf.Kashin(bits=3), 4, 521, id="fft-P-odd"),  # Makhoul's order of an odd length
]


def test_the_kashin_widths_reach_every_form_of_P():
    """The 300- and 520-wide cases above stay on the sides of the thresholds they are named for."""
    assert DENSE_TRANSFORM_MAX < 300 <= ACTIVATION_DENSE_MAX < 520


@pytest.mark.parametrize("make, out_f, in_f", AFFINE + KASHIN)
@pytest.mark.parametrize("tokens", [1, 3, NATIVE_MAX_TOKENS + 5, ACTIVATION_ROUTE_TOKENS // 2 + 1])  # × 2 sequences
def test_native_matches_decode(ops, make, out_f, in_f, tokens):
    layer = quantized(make(), out_f, in_f)
    x = torch.randn(2, tokens, in_f, generator=torch.Generator().manual_seed(tokens))
    assert layer._bind_native(), "this layout has a kernel"
    assert_close(*outputs(layer, x))


ROUTES = [1, TABLE_KERNEL_TOKENS, TABLE_KERNEL_TOKENS + 1, ACTIVATION_ROUTE_TOKENS, ACTIVATION_ROUTE_TOKENS + 1]


@pytest.mark.parametrize("make, in_f, routes", [
    (lambda: lf.Kashin(bits=3), 64, ["table", "table", "middle", "middle", "weight"]),  # P dense in the kernels
    (lambda: lf.Kashin(bits=3), 520, ["table", "table", "middle", "middle", "weight"]),  # P by FFT in Python
    # no middle route for vectors spanning rows or of more than 4 bits: the table route up to TABLE_ONLY_TOKENS
    (lambda: lf.Kashin(bits=3, rows_per_vector=2), 32, ["table" if 2 * t <= TABLE_ONLY_TOKENS else "weight"
                                                        for t in ROUTES]),  # (tokens count once per row)
    (lambda: lf.Kashin(bits=5), 32, ["table" if t <= TABLE_ONLY_TOKENS else "weight" for t in ROUTES]),
])
def test_kashin_takes_each_route_by_its_token_count(ops, monkeypatch, make, in_f, routes):
    """Up to TABLE_KERNEL_TOKENS the table route, up to ACTIVATION_ROUTE_TOKENS the middle one, above that the weight
    route (neither kernel call); each computes what the decode path does."""
    taken = []

    class Spy:  # the bound kernel, recording which of its routes ran
        def __init__(self, *args):
            self.inner = ops.KashinLayer(*args)

        def table(self, x, u=None):
            taken.append("table")
            return self.inner.table(x, u)

        def middle(self, x, u=None):
            taken.append("middle")
            return self.inner.middle(x, u)

        def bind_route(self, direct_tokens, columns, fallback):  # the kernel's own router, spied on
            self.inner.bind_route(direct_tokens, columns, lambda x: "fallback")
            self.fallback = fallback

        def __call__(self, x):
            y = self.inner(x)
            if isinstance(y, str):
                return self.fallback(x)
            taken.append("table")
            return y

    spy_ops = type("SpyOps", (), {"__getattr__": lambda self, name: getattr(ops, name), "KashinLayer": Spy})()
    monkeypatch.setattr(native, "ops", lambda: spy_ops)
    layer = quantized(make(), 12, in_f)
    for tokens, route in zip(ROUTES, routes):
        taken.clear()
        y, ref = outputs(layer, torch.randn(tokens, in_f, generator=torch.Generator().manual_seed(tokens)))
        assert (taken or ["weight"]) == [route], tokens
        assert_close(y, ref)


def test_the_kernel_is_what_runs(ops, monkeypatch):
    """A layer with kernel='native' calls the bound kernel (not the decode path) for a few-token input."""
    layer = quantized(lf.RTN(bits=3, group_size=16), 8, 32)
    monkeypatch.setattr(layer._method, "decode", staticmethod(lambda *a: pytest.fail("decode ran")))
    with torch.no_grad():
        layer(torch.randn(1, 32))


@pytest.mark.parametrize("make", [lambda: lf.Kashin(bits=3, codebook="kmeans"),
                                  lambda: lf.Kashin(bits=3, codebook="kmeans", form="matrix")])
def test_kashin_without_a_kernel_keeps_its_path(ops, make):
    layer = quantized(make(), 16, 32)
    assert layer._bind_native() is False
    assert_close(*outputs(layer, torch.randn(3, 32)))


def test_gradients_take_the_differentiable_path(ops):
    layer = quantized(lf.RTN(bits=3, group_size=16), 8, 32)
    x = torch.randn(2, 32, requires_grad=True)
    layer(x).sum().backward()
    grad_native = x.grad.clone()
    x.grad = None
    layer.kernel = "decode"
    layer(x).sum().backward()
    assert torch.allclose(grad_native, x.grad)


def test_other_dtypes_take_the_decode_path(ops):
    layer = quantized(lf.HQQ(bits=4, group_size=16), 8, 32)
    x = torch.randn(3, 32, dtype=torch.float64)
    with torch.no_grad():
        y = layer(x)
    assert y.dtype == torch.float64


def test_a_wrong_input_width_is_named(ops):
    layer = quantized(lf.RTN(bits=3, group_size=16), 8, 32)
    with torch.no_grad(), pytest.raises(RuntimeError):
        layer(torch.randn(2, 31))


@pytest.mark.parametrize("make, in_f", [(lambda: lf.Kashin(bits=3, col_scale=False), 64),  # P dense, in the kernel
                                         (lambda: lf.Kashin(bits=3), 300)])  # P by FFT
@pytest.mark.parametrize("tokens", [1, ACTIVATION_ROUTE_TOKENS + 6])  # the activation route, the weight route
def test_a_kashin_input_of_the_wrong_width_is_refused(ops, make, in_f, tokens):
    layer = quantized(make(), 8, in_f)
    for width in (in_f - 1, 2 * in_f):  # (twice the width fits the vector length: the codes would be overread)
        with torch.no_grad(), pytest.raises(RuntimeError, match=f"{width}"):
            layer(torch.randn(tokens, width))


def test_loading_other_codes_rebinds_the_kernel(ops):
    source, target = quantized(lf.RTN(bits=3, group_size=16), 8, 32, seed=1), quantized(lf.RTN(bits=3, group_size=16), 8, 32, seed=2)
    x = torch.randn(2, 32)
    with torch.no_grad():
        target(x)  # binds the kernel to target's own codes
        target.load_state_dict(source.state_dict())
        assert torch.equal(target(x), source(x))


def test_cache_and_kernel_switches_rebind(ops):
    layer = quantized(lf.Kashin(bits=3), 16, 32)
    x = torch.randn(2, 32)
    with torch.no_grad():
        native_y = layer(x)
        layer.cache = True
        assert layer._bind_native() is False  # the cached weight serves the forward
        assert_close(layer(x), native_y)
        layer.cache = False
        assert layer._bind_native()
    with pytest.raises(LeanformerError, match="unknown kernel 'fast'"):
        layer.kernel = "fast"


def test_a_kernel_that_routes_itself_is_freed_with_its_binding(ops):
    """The kernel holds its Python router and the router must not hold the kernel: a dropped binding is freed by
    reference counting (no cycle through the C++ object, which the garbage collector cannot see)."""
    import weakref

    layer = quantized(lf.Kashin(bits=3), 16, 32)
    with torch.no_grad():
        layer(torch.randn(1, 32))
        bound = weakref.ref(layer._native_fn)
        layer(torch.randn(40, 32))  # past the kernel's own route: its router runs, and still holds nothing back
        layer.kernel = "native"  # rebinds on the next call
    assert bound() is None


@pytest.mark.parametrize("make", [lambda: quantized(lf.Kashin(bits=3), 16, 32),
                                  lambda: layer_of(lf.KashinGPTQ(bits=3), 16, 32)], ids=["rows", "columns"])
def test_without_a_table_route_the_router_keeps_its_kernel(ops, monkeypatch, make):
    """Thresholds that leave the kernel no route of its own (benchmarks/route_crossover.py forces each route so): the
    layer then holds the router, which must hold the kernel."""
    import gc

    for name in ("TABLE_KERNEL_TOKENS", "TABLE_ONLY_TOKENS", "COLUMN_TABLE_TOKENS"):
        monkeypatch.setattr(kashin, name, 0)
    layer = make()
    with torch.no_grad():
        layer(torch.randn(1, 32))  # binds
    gc.collect()
    assert_close(*outputs(layer, torch.randn(2, 32)))


@pytest.mark.parametrize("make", [lambda: lf.Kashin(bits=3), lambda: lf.RTN(bits=3, group_size=16)])
def test_a_model_with_bound_kernels_deep_copies(ops, make):
    """copy.deepcopy (and pickle) of a model that has run: the copy binds its own kernel on first use."""
    import copy

    net = nn.Sequential(nn.Linear(32, 16))
    lf.quantize(net, make(), progress=False)
    unbound = copy.deepcopy(net)  # before any forward: nothing bound yet
    x = torch.randn(1, 32)
    with torch.no_grad():
        y = net(x)
        assert torch.equal(unbound(x), y)
        assert net[0]._native_fn
        twin = copy.deepcopy(net)
        assert torch.equal(twin(x), y) and twin[0]._native_fn is not net[0]._native_fn


BOUND = [pytest.param(lambda: lf.Kashin(bits=3), id="kashin"),
         pytest.param(lambda: lf.RTN(bits=3, group_size=16), id="rtn")]


@pytest.mark.parametrize("make", BOUND)
def test_the_bound_kernel_becomes_the_forward_and_sends_other_inputs_on(ops, make):
    """After the first call the kernel object is the module's forward (no Python per call); inputs it does not take
    (gradients wanted, other dtypes) still reach the differentiable decode path."""
    layer = quantized(make(), 16, 32)
    x = torch.randn(1, 32)
    with torch.no_grad():
        y = layer(x)
    assert layer.__dict__.get("forward") is layer._native_fn
    with torch.no_grad():
        assert torch.equal(layer(x), y)
        y64 = layer(x.double())
    assert y64.dtype == torch.float64 and torch.allclose(y64.float(), y, atol=1e-5)
    x_grad = x.clone().requires_grad_()
    out = layer(x_grad)
    assert out.requires_grad
    out.sum().backward()
    layer.kernel = "decode"
    assert "forward" not in layer.__dict__  # a switch drops the binding: the class's forward again
    x_ref = x.clone().requires_grad_()
    layer(x_ref).sum().backward()
    assert torch.allclose(x_grad.grad, x_ref.grad)


@pytest.mark.parametrize("make", BOUND)
def test_a_kept_kernel_forward_follows_the_module(ops, make):
    """A wrapper that captured the bound forward (as accelerate's hooks do) computes with the module's codes after a
    load replaced them: the dropped binding hands every call to the module's forward, which binds afresh."""
    source, target = quantized(make(), 16, 32, seed=1), quantized(make(), 16, 32, seed=2)
    x = torch.randn(1, 32)
    with torch.no_grad():
        target(x)
        kept = target.forward
        target.load_state_dict(source.state_dict())
        assert torch.equal(kept(x), source(x)) and torch.equal(target(x), source(x))


def test_a_forward_set_by_someone_else_is_kept(ops):
    layer = quantized(lf.RTN(bits=3, group_size=16), 16, 32)
    calls = []

    def wrapper(x):
        calls.append(1)
        return QuantizedLinear.forward(layer, x)

    layer.forward = wrapper
    with torch.no_grad():
        layer(torch.randn(1, 32))
        layer(torch.randn(1, 32))
    assert layer.__dict__["forward"] is wrapper and len(calls) == 2


@pytest.mark.parametrize("make", BOUND)
def test_a_model_with_a_bound_forward_is_freed(ops, make):
    """The kernel object holds its module only weakly: no cycle through the C++ object (which the garbage collector
    cannot see), so a model that has run is freed."""
    import gc
    import weakref

    net = nn.Sequential(nn.Linear(32, 16))
    lf.quantize(net, make(), progress=False)
    with torch.no_grad():
        net(torch.randn(1, 32))
        net(torch.randn(40, 32))  # Kashin: past the kernel's own route, through its router
    layer, kernel = weakref.ref(net[0]), weakref.ref(net[0]._native_fn)
    del net
    gc.collect()
    assert layer() is None and kernel() is None


def test_real_model_generates_the_same_tokens(ops, make_tiny_llama):
    model = make_tiny_llama(layers=2, vocab_size=64)
    lf.quantize(model, lf.Kashin(bits=3), progress=False)
    ids = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(0))
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        native_ids = model.generate(ids, **kwargs)
        for layer in quantized_layers(model).values():
            layer.kernel = "decode"
        assert torch.equal(model.generate(ids, **kwargs), native_ids)


def test_kernels_that_cannot_be_built_fall_back_with_one_warning(monkeypatch):
    layer = quantized(lf.RTN(bits=3, group_size=16, kernel="decode"), 8, 32)
    x = torch.randn(2, 32)
    with torch.no_grad():
        ref = layer(x)
    monkeypatch.setattr(native, "_STATE", {})

    def no_compiler(capability):
        raise RuntimeError("Error building extension: c++: command not found")
    monkeypatch.setattr(native, "build", no_compiler)
    layer.kernel = "native"
    with pytest.warns(UserWarning, match="could not be built here.*command not found.*plain torch ops"):
        with torch.no_grad():
            assert torch.equal(layer(x), ref)  # never a wrong result
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once, not on every call
        with torch.no_grad():
            layer(x)


def test_the_switch_off_variable(monkeypatch):
    monkeypatch.setattr(native, "_STATE", {})
    monkeypatch.setenv(native.DISABLE_ENV, "0")
    assert native.ops() is None


def test_portable_build_matches_the_vector_one(ops):
    """The scalar fallback (machines without AVX2, e.g. ARM) computes what the AVX2 build does."""
    portable = native.build("DEFAULT")
    for make, out_f, in_f in [(lambda: lf.RTN(bits=3, group_size=16), 24, 64),
                              (lambda: lf.HQQ(bits=4, group_size=None, col_scale=True), 9, 45),
                              (lambda: lf.Kashin(bits=3), 16, 64), (lambda: lf.Kashin(bits=4, rows_per_vector=2), 8, 24)]:
        layer = quantized(make(), out_f, in_f)
        for tokens in (3, ACTIVATION_ROUTE_TOKENS + 6):  # the activation route, and the weight route's kernels
            x = torch.randn(tokens, in_f)
            with torch.no_grad():
                layer._native_fn = None
                vector = layer(x)
                layer._native_fn = layer._method.native_linear(portable, layer.codes, layer.runtime_tensors(),
                                                               layer.header, layer.bias)
                assert_close(layer(x), vector)

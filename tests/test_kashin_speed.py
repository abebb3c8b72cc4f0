"""The fast Kashin forward: the rfft form of P, and Kashin.linear's two routes (P on the activations for
few tokens, on the weight read in the FFT's order for many) against a weight rebuilt from the stored
tensors by the definitions, with P from the explicit DCT-II matrix."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import leanformer as lf
from leanformer.compress import kashin
from leanformer.compress.kashin import DENSE_TRANSFORM_MAX, Kashin, Transform, _random_orthogonal, _signs
from leanformer.compress.packing import log8_decode
from leanformer.compress.packing import unpack_bits, unpack_codes
from leanformer.compress.quantization import quantized_layers
from leanformer.errors import LeanformerError


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def dct_matrix_by_definition(n: int) -> torch.Tensor:
    """Orthonormal DCT-II, C[k, m] = s_k cos(π (2m + 1) k / 2N), float64."""
    k, m = torch.arange(n, dtype=torch.float64)[:, None], torch.arange(n, dtype=torch.float64)[None, :]
    c = torch.cos(math.pi * (2 * m + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    c[0] /= math.sqrt(2.0)
    return c


def reference_P(kind: str, n: int, seed: int) -> torch.Tensor:
    """P (P z = M z) by its definition: Cᵀ diag(ε) C for "dct", the stored random orthogonal otherwise."""
    if kind == "random":
        return _random_orthogonal(n, seed).double()
    c = dct_matrix_by_definition(n)
    return c.T @ torch.diag(_signs(n, seed).double()) @ c


def reference_weight(tensors: dict, header: dict) -> torch.Tensor:
    """The vector-form weight from its stored tensors by the definitions, in float64: per vector
    Σ_j c_j s_j with s_j the sign of bit j of each code, the steps in the P domain multiplied by P
    (closed codebook), or c[code, 0] + P c[code, 1] times the vector's scale (kmeans); then the column scales."""
    out_f, in_f = header["shape"]
    bits, g = header["bits"], header["group_size"]
    n_vec = out_f * in_f // g
    codes = unpack_codes(tensors["packed"], bits, out_f * in_f).long().view(n_vec, g)
    P = reference_P(header["transform"], g, int(tensors["seed"][0]))
    if header["codebook"] == "kmeans":
        c = tensors["codebook"].double()
        w = (c[codes, 0] + c[codes, 1] @ P.T) * tensors["scale"].double()[:, None]
    else:
        steps, scale = tensors["steps"], tensors.get("scale")
        if "log_range" in tensors:
            steps, scale = (log8_decode(steps, tensors["log_range"]), scale) if scale is None else \
                (steps, log8_decode(scale, tensors["log_range"]))
        steps = steps.double().expand(n_vec, -1)
        if scale is not None:
            steps = steps * scale.double()[:, None]
        doms = unpack_bits(tensors["domains"], 1, n_vec * bits).view(n_vec, bits)
        w = torch.zeros(n_vec, g, dtype=torch.float64)
        for j in range(bits):
            term = steps[:, j:j + 1] * (((codes >> j) & 1) * 2 - 1)
            w += torch.where(doms[:, j:j + 1].bool(), term @ P.T, term)
    w = w.reshape(out_f, in_f)
    return w * tensors["col_scale"].double() if "col_scale" in tensors else w


def layer_weight(out_f: int, in_f: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out_f, in_f, generator=g) * torch.exp(0.5 * torch.randn(in_f, generator=g))


# (config, layer shape): vectors shorter than DENSE_TRANSFORM_MAX use the dense P, longer ones the FFT form
CASES = {
    "per-row-fft": (lf.Kashin(bits=3), (24, 320)),
    "per-row-dense": (lf.Kashin(bits=3), (24, 48)),
    "group-size-fft": (lf.Kashin(bits=3, group_size=300), (8, 600)),
    "group-size-dense": (lf.Kashin(bits=4, group_size=16), (20, 48)),
    "rows-per-vector-fft": (lf.Kashin(bits=3, rows_per_vector=2), (16, 160)),
    "rows-per-vector-dense": (lf.Kashin(bits=2, rows_per_vector=4), (16, 24)),
    "shared-steps": (lf.Kashin(bits=3, step_sizes="shared"), (24, 320)),
    "scale-bits-8": (lf.Kashin(bits=3, scale_bits=8), (24, 320)),
    "shared-scale-bits-8": (lf.Kashin(bits=3, step_sizes="shared", scale_bits=8, rows_per_vector=2), (16, 160)),
    "no-col-scale": (lf.Kashin(bits=3, col_scale=False), (24, 320)),
    "random-transform": (lf.Kashin(bits=3, transform="random"), (24, 40)),
    "random-rows-per-vector": (lf.Kashin(bits=3, transform="random", rows_per_vector=2), (16, 20)),
    "kmeans-fft": (lf.Kashin(bits=3, codebook="kmeans"), (24, 320)),
    "kmeans-dense": (lf.Kashin(bits=3, codebook="kmeans", group_size=16), (20, 48)),
    "matrix": (lf.Kashin(bits=3, codebook="kmeans", form="matrix"), (24, 40)),
}


@pytest.fixture(scope="module")
def stored():
    """{case: (stored tensors, header)} for every case, quantized once."""
    out = {}
    for name, (config, (out_f, in_f)) in CASES.items():
        tensors, header = config.quantize_weight(layer_weight(out_f, in_f), "layer")
        out[name] = tensors, {"method": "kashin", "bits": config.bits, "shape": [out_f, in_f], **header}
    return out


def codes_and_rest(tensors: dict, header: dict):
    out_f, in_f = header["shape"]
    codes = unpack_codes(tensors["packed"], header["bits"], out_f * in_f)
    return codes, {k: v for k, v in tensors.items() if k != "packed"}


@pytest.mark.parametrize("n", [1, 2, 3, 5, 64, 172, 300, 384])
@pytest.mark.parametrize("seed", [0, 11])
def test_dct_transform_matches_its_definition_in_every_form(n, seed):
    z = torch.randn(6, n, generator=torch.Generator().manual_seed(n))
    expected = z.double() @ reference_P("dct", n, seed).T
    P = Transform("dct", n, seed)
    order, inverse = P.order(z.device)
    assert torch.equal(order[inverse], torch.arange(n))
    for got in (P.apply(z), P.applyT(z), P.rows(z), P.rows(z, transpose=True), z @ P.matrix(z.device).T,
                P.apply_reordered(z[:, order])[:, inverse]):
        assert torch.allclose(got.double(), expected, atol=2e-6)
    assert P.dense == (n <= DENSE_TRANSFORM_MAX)


def test_random_transform_rows_apply_P_and_its_transpose():
    z = torch.randn(5, 24, generator=torch.Generator().manual_seed(0))
    P, M = Transform("random", 24, 3), reference_P("random", 24, 3)
    assert torch.allclose(P.rows(z).double(), z.double() @ M.T, atol=1e-6)
    assert torch.allclose(P.rows(z, transpose=True).double(), z.double() @ M, atol=1e-6)


@pytest.mark.parametrize("case", [c for c in CASES if c != "matrix"])  # the matrix form keeps its own rebuild
def test_decode_matches_the_definition(stored, case):
    tensors, header = stored[case]
    w = Kashin.dequantize(tensors, header)
    ref = reference_weight(tensors, header)
    assert w.dtype == torch.float32 and w.shape == ref.shape
    assert torch.allclose(w.double(), ref, atol=2e-6 * ref.abs().max().item())


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("route_tokens", [0, 10 ** 9], ids=["weight-route", "activation-route"])
@pytest.mark.parametrize("tokens", [1, 7, 96])
def test_linear_matches_the_rebuilt_weight_on_both_routes(stored, case, route_tokens, tokens, monkeypatch):
    monkeypatch.setattr(kashin, "ACTIVATION_ROUTE_TOKENS", route_tokens)
    tensors, header = stored[case]
    out_f, in_f = header["shape"]
    codes, rest = codes_and_rest(tensors, header)
    x = torch.randn(tokens, in_f, generator=torch.Generator().manual_seed(tokens))
    bias = torch.randn(out_f, generator=torch.Generator().manual_seed(1))
    w = reference_weight(tensors, header) if header["form"] == "vector" else Kashin.decode(codes, rest, header).double()
    expected = x.double() @ w.T + bias.double()
    y = Kashin.linear(x.view(1, tokens, in_f), codes, rest, header, bias)
    assert y.shape == (1, tokens, out_f) and y.dtype == torch.float32
    scale = x.abs().max().item() * w.abs().sum(1).max().item()
    assert torch.allclose(y[0].double(), expected, atol=3e-6 * scale)


def test_few_tokens_never_rebuild_the_weight_and_many_do(stored, monkeypatch):
    tensors, header = stored["per-row-fft"]
    codes, rest = codes_and_rest(tensors, header)
    in_f = header["shape"][1]
    expected = Kashin.linear(torch.ones(2, in_f), codes, rest, header, None)

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the weight was rebuilt")

    monkeypatch.setattr(Kashin, "_rebuild", staticmethod(no_rebuild))
    assert torch.allclose(Kashin.linear(torch.ones(2, in_f), codes, rest, header, None), expected)
    with pytest.raises(AssertionError, match="rebuilt"):
        Kashin.linear(torch.ones(kashin.ACTIVATION_ROUTE_TOKENS + 1, in_f), codes, rest, header, None)


def test_vectors_without_P_steps_skip_the_transform(monkeypatch):
    """Rows whose steps are all in the plain domain (here: a weight of only ±1, which sign steps fit
    exactly) have B = 0: neither route applies P."""
    weight = torch.where(torch.randn(8, 320, generator=torch.Generator().manual_seed(0)) > 0, 1.0, -1.0)
    tensors, header = lf.Kashin(bits=2, col_scale=False).quantize_weight(weight, "layer")
    header = {"method": "kashin", "bits": 2, "shape": [8, 320], **header}
    codes, rest = codes_and_rest(tensors, header)
    assert not unpack_bits(rest["domains"], 1, 16).any()

    def no_transform(*args, **kwargs):
        raise AssertionError("P was applied")

    for method in ("apply", "apply_reordered", "rows"):
        monkeypatch.setattr(Transform, method, no_transform)
    x = torch.randn(3, 320, generator=torch.Generator().manual_seed(1))
    for route_tokens in (0, 10 ** 9):
        monkeypatch.setattr(kashin, "ACTIVATION_ROUTE_TOKENS", route_tokens)
        assert torch.allclose(Kashin.linear(x, codes, rest, header, None), x @ weight.T, atol=1e-4)


def test_quantized_model_forward_matches_the_cached_weight(make_tiny_llama):
    """Through QuantizedLinear (which calls Kashin.linear unless the weight is cached): one token and a
    batch, against the same model computing with its rebuilt weights."""
    model = make_tiny_llama(layers=1, vocab_size=64, intermediate_size=48)
    lf.quantize(model, lf.Kashin(bits=3, rows_per_vector=2), progress=False)
    ids = torch.randint(0, 64, (4, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fast = [model(ids[:1, :1]).logits, model(ids).logits]
        for layer in quantized_layers(model).values():
            layer.cache = True
        cached = [model(ids[:1, :1]).logits, model(ids).logits]
    for a, b in zip(fast, cached):
        assert torch.allclose(a, b, atol=1e-4)


def test_activation_route_gradients_and_half_precision_inputs(stored):
    tensors, header = stored["rows-per-vector-fft"]
    codes, rest = codes_and_rest(tensors, header)
    w = Kashin.decode(codes, rest, header)
    x = torch.randn(3, header["shape"][1], generator=torch.Generator().manual_seed(0), requires_grad=True)
    Kashin.linear(x, codes, rest, header, None).square().sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    F.linear(x_ref, w).square().sum().backward()
    assert torch.allclose(x.grad, x_ref.grad, rtol=1e-4, atol=1e-4)
    y = Kashin.linear(x.detach().bfloat16(), codes, rest, header, None)
    assert y.dtype == torch.bfloat16
    assert torch.allclose(y.float(), F.linear(x.detach(), w), rtol=0.05, atol=0.05 * w.abs().max().item())


def test_input_of_the_wrong_width_is_refused(stored):
    tensors, header = stored["per-row-dense"]
    codes, rest = codes_and_rest(tensors, header)
    with pytest.raises(LeanformerError, match="input's last dimension is 47, it must be the layer's input width 48"):
        Kashin.linear(torch.ones(2, 47), codes, rest, header, None)

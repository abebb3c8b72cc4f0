"""RTN's and GPTQ's stored grids: 8-bit log-coded scales, integer zero points, the range search."""
from __future__ import annotations

import pytest
import torch

import leanformer as lf
from leanformer.compress.gptq import GPTQ
from leanformer.compress.packing import log8_decode, log8_encode, packed_nbytes
from leanformer.compress.plan import candidate_label, default_candidates
from leanformer.compress.rtn import CLIP_NORM, grid_codes, grid_scale, grid_values, minmax_grid
from leanformer.errors import LeanformerError

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def weight(out_f: int = 12, in_f: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("scale_bits,zero_point", [(16, "float16"), (8, "float16"), (16, "integer"), (8, "integer")])
def test_the_stored_bytes_are_the_codes_and_the_grids(bits, scale_bits, zero_point):
    w = weight(12, 64)
    tensors, header = lf.RTN(bits=bits, group_size=16, scale_bits=scale_bits, zero_point=zero_point).stored_form(w, "l")
    groups = 12 * 64 // 16
    expected = {"packed": packed_nbytes(w.numel(), bits), "scale": groups * scale_bits // 8,
                "zero": packed_nbytes(groups, bits) if zero_point == "integer" else 2 * groups}
    if scale_bits == 8:
        expected["log_range"] = 8  # two float32 per layer
    assert {k: v.numel() * v.element_size() for k, v in tensors.items()} == expected
    assert header["scale_bits"] == scale_bits and header["zero_point"] == zero_point


def test_an_integer_zero_point_keeps_zero_weights_exactly_zero():
    w = weight(8, 64)
    w[3] = w[3].abs() + 0.5  # a row of positive weights (but the zeros): the grid is stretched down to hold 0
    w[:, ::5] = 0.0
    for config in (lf.RTN(bits=3, group_size=16, zero_point="integer"),
                   lf.RTN(bits=2, group_size=None, scale_bits=8, zero_point="integer", clip=True)):
        w_hat = lf.RTN.dequantize(*config.stored_form(w, "l"))
        assert torch.equal(w_hat[:, ::5], torch.zeros_like(w_hat[:, ::5]))
    float_min = lf.RTN.dequantize(*lf.RTN(bits=3, group_size=16).stored_form(w, "l"))
    assert (float_min[:, ::5] != 0).any()  # the float16 minimum's grid does not contain 0 in general


def test_8_bit_scales_cost_a_fraction_of_a_per_cent_of_precision():
    w = weight(64, 64) * torch.logspace(-2, 1, 64)[:, None]  # rows whose ranges span three decades
    full = lf.RTN.dequantize(*lf.RTN(bits=4, group_size=16).stored_form(w, "l"))
    coded = lf.RTN.dequantize(*lf.RTN(bits=4, group_size=16, scale_bits=8).stored_form(w, "l"))
    err = lambda w_hat: float(((w - w_hat).norm(dim=1) / w.norm(dim=1)).mean())  # noqa: E731
    assert err(coded) < 1.05 * err(full)


def test_log8_codes_in_a_given_range_take_its_ends_outside_it():
    log_range = torch.tensor([-4.0, 0.0])
    codes, same = log8_encode(torch.tensor([0.0, 2.0 ** -6, 2.0 ** -4, 0.25, 1.0, 4.0]), log_range)
    assert same is log_range and codes.tolist() == [0, 1, 1, 128, 255, 255]
    assert torch.allclose(log8_decode(codes, log_range)[1:], torch.tensor([2.0 ** -4, 2.0 ** -4, 0.25, 1, 1]))


@pytest.mark.parametrize("zero_point", ["float16", "integer"])
@pytest.mark.parametrize("bits", [2, 3])
def test_the_range_search_never_rounds_a_group_worse_and_helps_most_at_2_bits(bits, zero_point):
    w = weight(256, 64, seed=bits)  # Gaussian rows: min-max grids waste their outer levels on the tails
    errors = {}
    for clip in (False, True):
        scale, zero = minmax_grid(w, bits, zero_point, None, clip)
        s = grid_scale(scale, None)
        w_hat = grid_values(grid_codes(w, s, zero, bits, zero_point), s, zero, zero_point)
        errors[clip] = (w_hat - w).abs().pow(CLIP_NORM).sum(1)
    assert (errors[True] <= errors[False]).all()
    assert errors[True].mean() < (0.6 if bits == 2 else 0.9) * errors[False].mean()


def test_gptq_keeps_the_compact_grid_and_still_compensates():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 96, generator=g) @ torch.randn(96, 96, generator=g)
    gram = x.double().T @ x.double()
    w = torch.randn(24, 96, generator=g)
    grid = {"scale_bits": 8, "zero_point": "integer", "clip": True}
    rtn_t, rtn_h = lf.RTN(bits=3, group_size=32, **grid).stored_form(w, "l")
    for act_order in (True, False):
        t, h = GPTQ(bits=3, group_size=32, act_order=act_order, **grid).stored_form(w, "l", gram)
        assert {k: (v.shape, v.dtype) for k, v in t.items()} == {k: (v.shape, v.dtype) for k, v in rtn_t.items()}
        out_err = lambda w_hat: float((((w - w_hat).double() @ gram) * (w - w_hat).double()).sum())  # noqa: E731
        assert out_err(GPTQ.dequantize(t, h)) < 0.7 * out_err(lf.RTN.dequantize(rtn_t, rtn_h))


def test_a_header_without_grid_keys_reads_as_float16_grids():
    """Layers saved before scale_bits and zero_point existed decode as they did."""
    w = weight()
    tensors, header = lf.RTN(bits=3, group_size=16).stored_form(w, "l")
    old = {k: v for k, v in header.items() if k not in ("scale_bits", "zero_point", "clip")}
    assert torch.equal(lf.RTN.dequantize(tensors, old), lf.RTN.dequantize(tensors, header))


@pytest.mark.parametrize("field,value", [("scale_bits", 12), ("zero_point", "int8")])
def test_bad_grid_settings_name_the_choices(field, value):
    for cls in (lf.RTN, GPTQ):
        with pytest.raises(LeanformerError, match=f"{field} must be one of"):
            cls(bits=3, **{field: value})


def test_the_default_plan_candidates_reach_layers_of_any_width():
    labels = [candidate_label(c) for c in default_candidates()]
    assert "gptq3/row scale_bits=8 zero_point=integer clip=True" in labels
    assert "gptq3/g64 scale_bits=8 zero_point=integer clip=True" in labels
    # per row on a 172-wide layer (64 does not divide it): b + (8 + b) / 172 bits, plus the log range
    tensors, _ = GPTQ(bits=3, group_size=None, scale_bits=8, zero_point="integer").stored_form(
        weight(64, 172), "down_proj", torch.eye(172, dtype=torch.float64))
    bits = 8 * sum(v.numel() * v.element_size() for v in tensors.values()) / (64 * 172)
    assert bits == pytest.approx(3 + 11 / 172 + 64 / (64 * 172), abs=2e-3)


def test_cli_stores_compact_grids_and_refuses_them_for_methods_without(tiny_llama_dir, tmp_path, capsys):
    from leanformer.cli import main

    out = tmp_path / "rtn"
    assert main(["compress", str(tiny_llama_dir), "--method", "rtn", "--bits", "3", "--group-size", "16",
                 "--scale-bits", "8", "--zero-point", "integer", "--clip", "--out", str(out)]) == 0
    model, _ = lf.load(out)
    headers = [m.header for m in model.modules() if hasattr(m, "header")]
    assert headers and all(h["scale_bits"] == 8 and h["zero_point"] == "integer" and h["clip"] for h in headers)
    # 3-bit codes, an 8-bit scale and a 3-bit zero per 16 weights, one 8-byte log range per layer
    total = lf.size_report(model).total
    assert 3 + 11 / 16 < total["bits_per_weight"] < 3 + 11 / 16 + 0.05
    assert main(["compress", str(tiny_llama_dir), "--method", "hqq", "--zero-point", "integer",
                 "--out", str(tmp_path / "x")]) == 2
    assert "--zero-point applies to rtn, gptq, not to --method hqq" in capsys.readouterr().err


@pytest.mark.parametrize("scale_bits,zero_point", [(16, "float16"), (16, "integer"), (8, "integer")])
def test_an_all_zero_group_stores_finite_codes_and_decodes_to_zero(scale_bits, zero_point):
    """A group whose range is 0 (a pruned neuron) must not divide by a float16 scale rounded to 0: NaN codes
    would be packed as garbage, into the bytes of the groups beside them too."""
    w = weight(8, 64)
    w[5] = 0.0
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 64, generator=g) @ torch.randn(64, 64, generator=g)
    gram = x.double().T @ x.double()
    for config, args in ((lf.RTN(bits=3, group_size=16, scale_bits=scale_bits, zero_point=zero_point), ()),
                         (GPTQ(bits=3, group_size=16, act_order=False, scale_bits=scale_bits, zero_point=zero_point),
                          (gram,))):
        tensors, header = config.stored_form(w, "l", *args)
        again, _ = config.stored_form(w, "l", *args)
        assert all(torch.equal(tensors[k], again[k]) for k in tensors)  # no NaN left to chance
        w_hat = type(config).dequantize(tensors, header)
        assert torch.isfinite(w_hat).all() and torch.equal(w_hat[5], torch.zeros(64))
        assert float((w_hat - w).norm() / w.norm()) < 0.3


def test_a_layer_expands_its_coded_grid_once_and_again_after_a_load(monkeypatch):
    from leanformer.compress.quantization import AffineQuantConfig

    compact = lf.RTN(bits=3, group_size=16, scale_bits=8, zero_point="integer", targets="all-linear",
                     kernel="decode")
    first, second = torch.nn.Sequential(torch.nn.Linear(64, 8)), torch.nn.Sequential(torch.nn.Linear(64, 8))
    for model in (first, second):
        lf.quantize(model, compact, progress=False)
    calls = []
    real = AffineQuantConfig.runtime_tensors.__func__
    monkeypatch.setattr(AffineQuantConfig, "runtime_tensors",
                        classmethod(lambda cls, t, h: calls.append(1) or real(cls, t, h)))
    x = torch.randn(3, 64)
    with torch.no_grad():
        first(x), first(x)
        assert len(calls) == 1  # the decode path reads the expanded grid it kept, not the codes again
        first.load_state_dict(second.state_dict())
        assert torch.equal(first(x), second(x)) and len(calls) == 3  # both expanded the loaded grid

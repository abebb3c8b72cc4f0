"""Kashin on narrow layers (short rows): whole-row vectors, 8-bit step sizes, the per-layer layout
choice; column scaling offered to RTN / HQQ."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import leanformer as lf
from leanformer.compress.packing import log8_decode, log8_encode
from leanformer.compress.quantization import QuantizedLinear, relative_weight_errors
from leanformer.errors import LeanformerError

IDS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def narrow_layer(seed: int = 0, in_f: int = 48, out_f: int = 96) -> nn.Sequential:
    """One bias-free Linear with short rows whose input columns have log-normal sizes (heavy-tailed:
    a few columns are many times the median)."""
    g = torch.Generator().manual_seed(seed)
    layer = nn.Sequential(nn.Linear(in_f, out_f, bias=False))
    layer[0].weight.data = torch.randn(out_f, in_f, generator=g) * torch.exp(torch.randn(in_f, generator=g))
    return layer


def quantized(base: nn.Module, config) -> tuple[nn.Module, float, float]:
    """(quantized copy, relative weight error of layer "0", honest bits per weight)."""
    model = copy.deepcopy(base)
    lf.quantize(model, config, progress=False)
    return model, relative_weight_errors(base, model)["0"], lf.size_report(model).total["bits_per_weight"]


def error_per_bit(error: float, bits: float) -> float:
    """Relative error × 2^(bits/weight): compares layouts of different sizes (at high rate one more bit
    halves the RMS error, Cover & Thomas Thm 10.3.2)."""
    return error * 2 ** bits


# ---------------------------------------------------------------------------------- whole-row vectors


def test_whole_row_vectors_beat_per_row_in_error_per_bit():
    base = narrow_layer()
    _, err1, bits1 = quantized(base, lf.Kashin(bits=3))
    for rows in (2, 4):
        model, err, bits = quantized(base, lf.Kashin(bits=3, rows_per_vector=rows))
        assert model.get_submodule("0").header["group_size"] == rows * 48
        # the step sizes and domain bits are spread over `rows` times the weights: metadata ÷ rows
        assert bits1 - bits == pytest.approx((3 * 16 + 3) / 48 * (1 - 1 / rows), abs=0.01)
        assert err < 1.25 * err1 and error_per_bit(err, bits) < 0.8 * error_per_bit(err1, bits1)


@pytest.mark.parametrize("config", [
    lf.Kashin(bits=3, rows_per_vector=2),
    lf.Kashin(bits=2, rows_per_vector=4, step_sizes="shared", scale_bits=8),
    lf.Kashin(bits=4, layout="auto"),
], ids=["rows2", "rows4-shared-8bit", "auto"])
def test_narrow_layouts_save_and_load_bit_identically(config, make_tiny_llama, tmp_path):
    model = make_tiny_llama(layers=1, vocab_size=64, intermediate_size=48)
    report = lf.quantize(model, config, progress=False)
    assert not report.skipped
    lf.save(model, None, tmp_path / "q")
    loaded, _ = lf.load(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, loaded(input_ids=IDS).logits)
    for name in report.quantized:
        ours, theirs = model.get_submodule(name), loaded.get_submodule(name)
        assert theirs.header == ours.header and torch.equal(theirs.dequantize(), ours.dequantize())
    assert lf.size_report(loaded).total == lf.size_report(model).total


# ---------------------------------------------------------------------------------- 8-bit step sizes


def test_log8_codes_keep_relative_precision_and_exact_zeros():
    g = torch.Generator().manual_seed(0)
    values = torch.exp2(torch.rand(500, generator=g) * 6 - 3)  # a 6-octave spread
    values[:3] = 0
    codes, log_range = log8_encode(values)
    assert codes.dtype == torch.uint8 and log_range.dtype == torch.float32 and log_range.numel() == 2
    back = log8_decode(codes, log_range)
    assert torch.equal(back[:3], torch.zeros(3))
    rel = (back[3:] / values[3:]).log2().abs()
    assert rel.max() <= 6 / 508 + 1e-4  # half a code step
    # values far below the largest (more than 16 octaves) store exactly zero rather than stretch the range
    tiny = torch.tensor([1.0, 0.5, 1e-6])
    assert torch.equal(log8_decode(*log8_encode(tiny)), torch.tensor([1.0, 0.5, 0.0]))


@pytest.mark.parametrize("step_sizes", ["vector", "shared"])
def test_8bit_step_sizes_halve_that_metadata_at_no_visible_cost(step_sizes):
    base = narrow_layer(1)
    m16, err16, _ = quantized(base, lf.Kashin(bits=3, step_sizes=step_sizes))
    m8, err8, _ = quantized(base, lf.Kashin(bits=3, step_sizes=step_sizes, scale_bits=8))
    b16 = lf.size_report(m16).layers[0]["breakdown"]
    b8 = lf.size_report(m8).layers[0]["breakdown"]
    per_vector = "steps" if step_sizes == "vector" else "scale"
    assert b8[per_vector] * 2 == b16[per_vector] and b8["log_range"] == 8
    assert set(b8) - set(b16) == {"log_range"}
    assert err8 < 1.01 * err16


# ---------------------------------------------------------------------------------- layout="auto"


@pytest.mark.parametrize("given", [
    dict(), dict(step_sizes="shared"), dict(rows_per_vector=2), dict(col_scale=False), dict(scale_bits=8),
], ids=["default", "shared", "rows2", "no-col-scale", "8bit"])
def test_auto_never_stores_more_than_the_given_layout(given):
    base = narrow_layer(2)
    fixed, err_fixed, bits_fixed = quantized(base, lf.Kashin(bits=3, **given))
    auto, err_auto, bits_auto = quantized(base, lf.Kashin(bits=3, layout="auto", **given))
    assert bits_auto <= bits_fixed
    # the given layout is a candidate, so the chosen one is within the 1 % tie of its error or better
    assert err_auto <= 1.01 * err_fixed + 1e-9
    header = auto.get_submodule("0").header
    rows = given.get("rows_per_vector", 1)
    assert header["layout"] == "auto" and header["group_size"] in [48 * rows * m for m in (1, 2, 4)]
    # the header describes what is stored
    tensors = auto.get_submodule("0").stored_tensors()
    assert header["col_scale"] == ("col_scale" in tensors)
    assert (header["scale_bits"] == 8) == ("log_range" in tensors)
    assert (header["step_sizes"] == "shared") == ("scale" in tensors)


def test_auto_chooses_per_layer_on_a_model(make_tiny_llama):
    base = make_tiny_llama(layers=2, vocab_size=64, intermediate_size=48)
    fixed, auto = copy.deepcopy(base), copy.deepcopy(base)
    lf.quantize(fixed, lf.Kashin(bits=3), progress=False)
    lf.quantize(auto, lf.Kashin(bits=3, layout="auto"), progress=False)
    sizes_fixed = {r["name"]: r["bytes"] for r in lf.size_report(fixed).layers}
    sizes_auto = {r["name"]: r["bytes"] for r in lf.size_report(auto).layers}
    assert sizes_fixed.keys() == sizes_auto.keys()
    assert all(sizes_auto[n] <= sizes_fixed[n] for n in sizes_fixed)
    assert sum(sizes_auto.values()) < sum(sizes_fixed.values())
    with torch.no_grad():
        assert torch.isfinite(auto(input_ids=IDS).logits).all()


# ---------------------------------------------------------------------------------- col_scale for RTN / HQQ


def equal_rms_columns(seed: int = 0, in_f: int = 64, out_f: int = 32) -> nn.Sequential:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    layer = nn.Sequential(nn.Linear(in_f, out_f, bias=False))
    layer[0].weight.data = w / w.pow(2).mean(0).sqrt()  # every column's RMS is 1 (to float rounding)
    return layer


@pytest.mark.parametrize("method", [lf.RTN, lf.HQQ])
def test_col_scale_changes_nothing_on_equal_rms_columns_and_stores_one_fp16_per_column(method):
    base = equal_rms_columns()
    plain, _, _ = quantized(base, method(bits=3, group_size=16))
    scaled, _, _ = quantized(base, method(bits=3, group_size=16, col_scale=True))
    stored = scaled.get_submodule("0").stored_tensors()["col_scale"]
    assert stored.dtype == torch.float16 and stored.shape == (64,) and torch.equal(stored, torch.ones(64, dtype=torch.float16))
    assert torch.equal(scaled.get_submodule("0").dequantize(), plain.get_submodule("0").dequantize())
    assert lf.size_report(scaled).total["bytes"] - lf.size_report(plain).total["bytes"] == 2 * 64
    assert "col_scale" not in plain.get_submodule("0").stored_tensors()


@pytest.mark.parametrize("method", [lf.RTN, lf.HQQ])
def test_col_scale_helps_rtn_and_hqq_on_heavy_tailed_columns(method, tmp_path, make_tiny_llama):
    base = narrow_layer()
    _, err_plain, _ = quantized(base, method(bits=3, group_size=None))
    _, err_scaled, _ = quantized(base, method(bits=3, group_size=None, col_scale=True))
    assert err_scaled < 0.85 * err_plain
    # and it survives save / load
    model = make_tiny_llama(layers=1, vocab_size=64)
    lf.quantize(model, method(bits=4, group_size=16, col_scale=True), progress=False)
    lf.save(model, None, tmp_path / "q")
    loaded, _ = lf.load(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, loaded(input_ids=IDS).logits)


def test_zero_columns_stay_finite_with_col_scale():
    layer = narrow_layer()
    layer[0].weight.data[:, 5] = 0
    for config in (lf.Kashin(bits=3), lf.RTN(bits=3, group_size=None, col_scale=True)):
        model, err, _ = quantized(layer, config)
        w = model.get_submodule("0").dequantize()
        assert torch.isfinite(w).all() and err < 0.3


# ---------------------------------------------------------------------------------- bad input


def test_bad_vector_layouts_name_the_valid_choices(make_tiny_llama):
    model = make_tiny_llama(layers=1, vocab_size=64, intermediate_size=48)  # rows: 32 (q, o, down), 16 (k, v), 48
    with pytest.raises(LeanformerError, match=r"rows_per_vector=3 does not divide the 32 output rows of layer "
                                              r"model\.layers\.0\.self_attn\.q_proj; nearest that do: 1, 2, 4, 8"):
        lf.quantize(model, lf.Kashin(bits=3, rows_per_vector=3), progress=False)
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())
    with pytest.raises(LeanformerError, match=r"group size 24 does not divide the input width 32 .*16, 32"):
        lf.quantize(model, lf.Kashin(bits=3, group_size=24), progress=False)
    with pytest.raises(LeanformerError, match="either group_size=16 .* or rows_per_vector=2"):
        lf.Kashin(bits=3, group_size=16, rows_per_vector=2)
    with pytest.raises(LeanformerError, match="rows_per_vector must be a positive integer, got 0"):
        lf.Kashin(bits=3, rows_per_vector=0)
    with pytest.raises(LeanformerError, match="scale_bits must be one of 16, 8, got 12"):
        lf.Kashin(bits=3, scale_bits=12)
    with pytest.raises(LeanformerError, match="unknown layout 'best'; choose from fixed, auto"):
        lf.Kashin(bits=3, layout="best")
    with pytest.raises(LeanformerError, match="form='matrix' has none"):
        lf.Kashin(bits=3, codebook="kmeans", form="matrix", rows_per_vector=2)
    with pytest.raises(LeanformerError, match="use scale_bits=16 with it"):
        lf.Kashin(bits=3, codebook="kmeans", scale_bits=8)

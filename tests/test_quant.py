"""Quantization: packing, transforms, Kashin / RTN / HQQ mechanics, honest sizes, save/load, errors."""
from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
from torch import nn

import leanformer as lf
import leanformer.files
from leanformer.compress.kmeans import kmeans
from leanformer.compress.packing import pack_bits, packed_nbytes, unpack_bits
from leanformer.compress import quantization
from leanformer.compress.quantization import QuantizedLinear, relative_weight_errors
from leanformer.targets import select_linear
from leanformer.compress.kashin import Transform, dct, idct, kashin_matrix, kashin_vectors, _matrix
from leanformer.errors import LeanformerError

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


@pytest.fixture
def tied_llama(make_tiny_llama):
    """tied_llama(seed=0): a 2-block random Llama with tied input/output embeddings (vocabulary 64) and an
    FFN width, 48, that is not a power of two."""
    return functools.partial(make_tiny_llama, layers=2, vocab_size=64, intermediate_size=48,
                             tie_word_embeddings=True)


IDS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))  # valid for both tiny vocabularies

CONFIGS = [lambda b: lf.Kashin(bits=b), lambda b: lf.Kashin(bits=b, step_sizes="shared"),
           lambda b: lf.Kashin(bits=b, codebook="kmeans"),
           lambda b: lf.Kashin(bits=b, codebook="kmeans", form="matrix", transform="random"),
           lambda b: lf.RTN(bits=b, group_size=16), lambda b: lf.HQQ(bits=b, group_size=16),
           lambda b: lf.RTN(bits=b, group_size=16, scale_bits=8, zero_point="integer", clip=True)]


# ---------------------------------------------------------------------------------- packing


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
def test_pack_roundtrip_and_size(bits):
    n = 1001  # odd, so the last byte is partial
    idx = torch.randint(0, 2 ** bits, (n,), generator=torch.Generator().manual_seed(bits))
    packed = pack_bits(idx, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(n * bits / 8) == packed_nbytes(n, bits)
    assert torch.equal(unpack_bits(packed, bits, n), idx)
    with pytest.raises(LeanformerError, match="packed index stream"):
        unpack_bits(packed[:-1], bits, n)


# ---------------------------------------------------------------------------------- transforms


@pytest.mark.parametrize("n", [7, 16, 172])
def test_dct_matches_scipy_and_inverts(n):
    import scipy.fft

    x = torch.randn(3, n, generator=torch.Generator().manual_seed(n))
    ref = torch.tensor(scipy.fft.dct(x.numpy(), norm="ortho"))
    assert torch.allclose(dct(x), ref, atol=1e-5)
    assert torch.allclose(idct(dct(x)), x, atol=1e-5)


@pytest.mark.parametrize("kind", ["dct", "random"])
def test_transforms_are_orthogonal_and_match_dense_form(kind):
    P = Transform(kind, 24, seed=3)
    eye = torch.eye(24)
    M = P.apply(eye).T  # column j = P e_j
    assert torch.allclose(M @ M.T, eye, atol=1e-5)
    assert torch.allclose(P.applyT(P.apply(eye)), eye, atol=1e-5)
    assert torch.allclose(M, _matrix(kind, 24, 3), atol=1e-5)


def test_kashin_decompositions_converge_with_small_factors():
    x = torch.randn(50, 128, generator=torch.Generator().manual_seed(0))
    x[:, 0] *= 20  # outliers are what a Kashin representation spreads out
    P = Transform("dct", 128, seed=0)
    u, v, rel, it = kashin_vectors(x, P, tol=1e-4, max_iter=300)
    assert rel.max() < 1e-4
    assert torch.allclose(u + P.apply(v), x, atol=1e-3 * x.abs().max())
    # the defining property: ‖u‖∞, ‖v‖∞ = O(‖x‖₂/√N), far below the outlier magnitude
    rms = x.norm(dim=1) / math.sqrt(128)
    level = torch.maximum(u.abs().amax(1), v.abs().amax(1)) / rms
    assert level.max() < 2 and (x.abs().amax(1) / rms).median() > 4
    q1, q2 = _matrix("random", 50, 1), _matrix("random", 128, 2)
    U, V, rel_m, _ = kashin_matrix(x / x.norm() * math.sqrt(x.numel()), q1, q2, tol=1e-3, max_iter=500)
    assert rel_m < 1e-3


def test_kmeans_is_deterministic_and_finds_clusters():
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[0.0, 0.0], [5.0, 5.0], [-5.0, 5.0]])
    pts = centers[torch.randint(0, 3, (3000,), generator=g)] + 0.1 * torch.randn(3000, 2, generator=g)
    c1, l1 = kmeans(pts, 3, seed=4)
    c2, l2 = kmeans(pts, 3, seed=4)
    assert torch.equal(c1, c2) and torch.equal(l1, l2)
    assert torch.cdist(centers, c1).min(1).values.max() < 0.05


# ---------------------------------------------------------------------------------- the verb


def test_default_targets_skip_embeddings_and_heads(make_tiny_bert, tied_llama):
    model = make_tiny_bert(head="sequence-classification")
    names = select_linear(model)
    assert names and all(".layer." in n for n in names)
    assert not any("classifier" in n or "pooler" in n for n in names)
    llama = tied_llama()
    assert "lm_head" not in select_linear(llama)
    assert select_linear(llama, ["q_proj"]) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]


@pytest.mark.parametrize("make", CONFIGS, ids=["kashin", "kashin-shared", "kashin-kmeans", "kashin-matrix", "rtn", "hqq",
                                          "rtn-compact"])
def test_quantize_replaces_targets_and_error_shrinks_with_bits(make, make_tiny_bert):
    base = make_tiny_bert()
    errs = {}
    for bits in (2, 4, 8):
        model = copy.deepcopy(base)
        report = lf.quantize(model, make(bits), progress=False)
        assert not report.skipped and len(report.quantized) == len(select_linear(base))
        assert all(isinstance(model.get_submodule(n), QuantizedLinear) for n in report.quantized)
        errs[bits] = max(relative_weight_errors(base, model).values())
        out = model(input_ids=IDS).last_hidden_state
        assert torch.isfinite(out).all()
    assert errs[8] < errs[4] < errs[2] < 1.0
    assert errs[8] < 0.05


def test_kashin_closed_form_beats_rtn_on_heavy_tailed_rows():
    # rows with a few large entries: min-max RTN wastes levels on them, Kashin spreads them out
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=g) * 0.02
    w[torch.rand(64, 256, generator=g) < 0.01] *= 12
    layer = nn.Sequential(nn.Linear(256, 64))
    layer[0].weight.data = w
    errs = {}
    for name, cfg in {"kashin": lf.Kashin(bits=4, targets=["0"]), "rtn": lf.RTN(bits=4, group_size=None, targets=["0"])}.items():
        m = copy.deepcopy(layer)
        lf.quantize(m, cfg, progress=False)
        errs[name] = relative_weight_errors(layer, m)["0"]
    assert errs["kashin"] < errs["rtn"]


def test_hqq_wrapper_matches_the_hqq_package():
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    layer = nn.Sequential(nn.Linear(128, 48))
    ours = copy.deepcopy(layer)
    lf.quantize(ours, lf.HQQ(bits=4, group_size=64, targets=["0"]), progress=False)
    theirs = HQQLinear(copy.deepcopy(layer[0]), BaseQuantizeConfig(nbits=4, group_size=64),
                       compute_dtype=torch.float32, device="cpu")
    w_ours, w_theirs = ours[0].dequantize(), theirs.dequantize().float()
    w = layer[0].weight.detach()
    # the same up to our float16 storage of scale and zero (codes re-rounded against it), and as accurate
    assert (w_ours - w_theirs).norm() / w.norm() < 1e-2
    assert (w_ours - w).norm() < 1.02 * (w_theirs - w).norm()


def test_cache_gives_the_same_outputs(make_tiny_bert):
    base = make_tiny_bert()
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    lf.quantize(a, lf.Kashin(bits=3), progress=False)
    lf.quantize(b, lf.Kashin(bits=3, cache=True), progress=False)
    ya, yb, yb2 = (m(input_ids=IDS).last_hidden_state for m in (a, b, b))
    # Kashin's own forward (Kashin.linear) sums in another order than a matmul with the rebuilt weight
    torch.testing.assert_close(ya, yb, atol=1e-5, rtol=0)
    assert torch.equal(yb, yb2)


def test_unconverged_layers_stay_full_precision_and_are_reported(make_tiny_bert):
    model, base = make_tiny_bert(), make_tiny_bert()
    with pytest.warns(UserWarning, match="kept in full precision"):
        report = lf.quantize(model, lf.Kashin(bits=4, tol=1e-6, max_iter=2, targets=["query"]), progress=False)
    assert not report.quantized and set(report.skipped) == set(select_linear(base, ["query"]))
    assert "after 2 iterations" in next(iter(report.skipped.values()))
    assert isinstance(model.encoder.layer[0].attention.self.query, nn.Linear)
    sizes = lf.size_report(model)
    assert [r["method"] for r in sizes.layers] == ["none", "none"]
    assert sizes.total["bits_per_weight"] == 32


# ---------------------------------------------------------------------------------- sizes


def test_size_report_counts_every_stored_byte(make_tiny_bert):
    n_linear = len(select_linear(make_tiny_bert()))
    assert n_linear == 12  # 6 Linear layers in each of the 2 blocks
    model = make_tiny_bert()
    lf.quantize(model, lf.RTN(bits=3, group_size=16), progress=False)
    rep = lf.size_report(model)
    assert len(rep.layers) == n_linear
    for r in rep.layers:  # 3-bit codes + fp16 scale + fp16 zero per 16 weights
        assert r["bytes"] == math.ceil(r["n_weights"] * 3 / 8) + 2 * 2 * r["n_weights"] // 16
    assert rep.total["bits_per_weight"] == pytest.approx(3 + 32 / 16, abs=1e-3)

    model = make_tiny_bert()
    lf.quantize(model, lf.Kashin(bits=4, group_size=16), progress=False)
    assert len(lf.size_report(model).layers) == n_linear
    for r in lf.size_report(model).layers:
        n, rows = r["n_weights"], r["n_weights"] // 16
        # indices + 4 fp16 step sizes and 4 domain bits per vector + an fp16 scale per input column + the seed
        in_f = model.get_submodule(r["name"]).in_features
        expect = math.ceil(n * 4 / 8) + rows * 4 * 2 + math.ceil(rows * 4 / 8) + 2 * in_f + 8
        assert r["bytes"] == expect and r["breakdown"]["steps"] == rows * 8

    model = make_tiny_bert()
    lf.quantize(model, lf.Kashin(bits=3, step_sizes="shared"), progress=False)
    assert len(lf.size_report(model).layers) == n_linear
    for r in lf.size_report(model).layers:
        n, rows = r["n_weights"], model.get_submodule(r["name"]).out_features
        in_f = n // rows
        # indices + 3 shared fp16 steps + an fp16 scale and 3 domain bits per row + column scales + seed
        expect = math.ceil(n * 3 / 8) + 3 * 2 + rows * 2 + math.ceil(rows * 3 / 8) + 2 * in_f + 8
        assert r["bytes"] == expect


# ---------------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("make", CONFIGS, ids=["kashin", "kashin-shared", "kashin-kmeans", "kashin-matrix", "rtn", "hqq",
                                          "rtn-compact"])
def test_save_load_is_bit_identical(make, tmp_path, tied_llama):
    model = tied_llama()
    name = lf.quantize(model, make(3), progress=False).quantized[0]
    lf.save(model, None, tmp_path / "q")
    loaded, tok = lf.load(tmp_path / "q")
    assert tok is None and type(loaded).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, loaded(input_ids=IDS).logits)
    # the packed indices on disk are the packed indices in memory
    assert torch.equal(loaded.get_submodule(name).stored_tensors()["packed"], model.get_submodule(name).stored_tensors()["packed"])
    assert lf.size_report(loaded).total == lf.size_report(model).total


def test_load_rejects_packed_size_mismatch(tmp_path, make_tiny_bert):
    from safetensors.torch import load_file, save_file

    model = make_tiny_bert()
    lf.quantize(model, lf.RTN(bits=4, group_size=16), progress=False)
    lf.save(model, None, tmp_path / "q")
    f = tmp_path / "q" / "leanformer.safetensors"
    tensors = load_file(f)
    key = "encoder.layer.0.attention.self.query.packed"
    tensors[key] = tensors[key][:-3]
    save_file(tensors, f)
    with pytest.raises(LeanformerError, match="encoder.layer.0.attention.self.query"):
        lf.load(tmp_path / "q")


def test_save_refuses_an_existing_dir(tmp_path, make_tiny_bert):
    model = make_tiny_bert()
    lf.quantize(model, lf.RTN(bits=4, group_size=16), progress=False)
    lf.save(model, None, tmp_path / "q")
    with pytest.raises(LeanformerError, match="already exists"):
        lf.save(model, None, tmp_path / "q")


# ---------------------------------------------------------------------------------- bad input


def test_unsupported_bits_name_the_supported_set():
    with pytest.raises(LeanformerError, match=r"supported: 2, 3, 4, 5, 6, 8"):
        lf.Kashin(bits=7)
    with pytest.raises(LeanformerError, match=r"bits=9"):
        lf.RTN(bits=9)
    with pytest.raises(LeanformerError, match="transform"):
        lf.Kashin(transform="hadamard")


def test_group_size_not_dividing_width_names_layer_and_choices(make_tiny_bert):
    model = make_tiny_bert()
    with pytest.raises(LeanformerError, match=r"group size 24 does not divide the input width 32 of layer "
                                              r"encoder\.layer\.0\.attention\.self\.query.*32"):
        lf.quantize(model, lf.RTN(bits=4, group_size=24), progress=False)
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())


def test_nan_weight_names_the_layer_and_leaves_model_untouched(make_tiny_bert):
    model = make_tiny_bert()
    model.encoder.layer[1].output.dense.weight.data[0, 0] = float("nan")
    with pytest.raises(LeanformerError, match=r"encoder\.layer\.1\.output\.dense has 1 NaN/Inf"):
        lf.quantize(model, lf.Kashin(bits=4), progress=False)
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())


def test_targets_matching_nothing_list_the_real_names(make_tiny_bert):
    with pytest.raises(LeanformerError, match=r"match no Linear.*query.*value"):
        lf.quantize(make_tiny_bert(), lf.HQQ(bits=4, targets=["q_proj"]), progress=False)


# ---------------------------------------------------------------------------------- real weights + CLI


def test_cli_compress_minilm_roundtrip_and_errors(tmp_path, capsys):
    from leanformer.cli import main

    out = tmp_path / "m-rtn4"
    assert main(["compress", "minilm", "--method", "rtn", "--bits", "4", "--targets", "query", "value",
                 "--out", str(out)]) == 0
    assert {"leanformer.json", "leanformer.safetensors", "size.json"} <= {p.name for p in out.iterdir()}
    model, tok = lf.load(out)
    ref, _ = lf.load("minilm")
    assert sum(isinstance(m, QuantizedLinear) for m in model.modules()) == 12
    cos = lf.embedding_cosine(model, ref, tok, ["a fine film", "the plot was dull and slow"])
    assert cos["embedding_cosine"] > 0.95
    assert main(["compress", "minilm", "--method", "rtn", "--bits", "4", "--out", str(out)]) == 2
    assert main(["compress", "minilm", "--method", "kashin", "--bits", "7", "--out", str(tmp_path / "x")]) == 2
    assert main(["compress", "minilm", "--method", "hqq", "--bits", "4", "--group-size", "100",
                 "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "supported: 2, 3, 4, 5, 6, 8" in err and "nearest group sizes" in err


def test_cli_compress_then_eval_stories260k(tmp_path, shared_data):
    from leanformer.cli import main

    out = tmp_path / "s-k3"
    assert main(["compress", "stories260k", "--method", "kashin", "--bits", "3", "--step-sizes", "shared",
                 "--out", str(out)]) == 0
    text = tmp_path / "t.txt"  # about 1,000 tokens: on one sentence the 3-bit model can come out ahead by chance
    text.write_text((shared_data / "text" / "tinystories.valid.txt").read_text(encoding="utf-8")[:2000])
    assert main(["eval", str(out), "--text", str(text), "--out", str(tmp_path / "ev")]) == 0
    metrics = leanformer.files.load_json(tmp_path / "ev" / "metrics.json")
    fp, tok = lf.load("stories260k")
    ppl_fp = lf.perplexity(fp, tok, [text.read_text()])["perplexity"]
    # quantized is worse than full precision but still a language model (uniform over 512 tokens = 512)
    assert ppl_fp < metrics["perplexity"] < 4 * ppl_fp


@pytest.mark.slow
def test_kashin_on_minilm_keeps_sentence_embeddings():
    model, tok = lf.load("minilm")
    ref = copy.deepcopy(model)
    report = lf.quantize(model, lf.Kashin(bits=4), progress=False)
    assert len(report.quantized) == 36 and not report.skipped
    assert lf.size_report(model).total["bits_per_weight"] < 4.2
    texts = ["a gripping, beautifully shot film", "it is a mess from start to finish", "the cat sat on the mat"]
    assert lf.embedding_cosine(model, ref, tok, texts)["embedding_cosine"] > 0.9


@pytest.mark.parametrize("broken", ["raises", "disagrees"])
def test_compiled_kernel_that_cannot_run_falls_back_with_a_warning(broken, monkeypatch):
    layer = nn.Linear(64, 48)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    plain = nn.Sequential(copy.deepcopy(layer))
    lf.quantize(plain, lf.RTN(bits=3, group_size=16, kernel="decode"), progress=False)
    compiled = nn.Sequential(copy.deepcopy(layer))
    lf.quantize(compiled, lf.RTN(bits=3, group_size=16, kernel="compiled"), progress=False)

    def fake_compile(fn, **kwargs):
        if broken == "raises":
            raise RuntimeError("no C++ compiler found")
        return lambda *a: fn(*a) + 1.0  # a back end that computes the wrong weight
    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(quantization, "_COMPILED", {})
    with pytest.warns(UserWarning, match="kernel='compiled' is not usable.*falling back to kernel='decode'"):
        out = compiled(x)
    assert torch.equal(out, plain(x))  # never a wrong result
    assert compiled[0].kernel == "decode"


def test_unknown_kernel_is_named():
    with pytest.raises(LeanformerError, match="unknown kernel 'int4'; choose from native, decode, compiled"):
        lf.RTN(kernel="int4")

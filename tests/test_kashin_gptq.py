"""KashinGPTQ: Kashin's closed codebook on W's columns, inside GPTQ's error compensation; its column-vector form
decoded, run by torch and by the fused kernels alike."""
from __future__ import annotations

import copy

import pytest
import torch

import leanformer as lf
from leanformer.cli import main
from leanformer.compress import native
from leanformer.compress.calibration import calibration_batches, measure_inputs
from leanformer.compress.kashin import ACTIVATION_DENSE_MAX, Kashin, Transform, closed_form
from leanformer.compress.kashin_gptq import KashinGPTQ
from leanformer.compress.quantization import QuantizedLinear, quantized_layers
from leanformer.errors import LeanformerError

from test_gptq import TEXTS, correlated_layer, output_error

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def layer_of(config: KashinGPTQ, out_f: int, in_f: int, seed: int = 0, bias: bool = True) -> QuantizedLinear:
    w, gram = correlated_layer(out_f, in_f, seed)
    tensors, header = config.stored_form(w, "l", gram)
    b = torch.randn(out_f, generator=torch.Generator().manual_seed(seed)) if bias else None
    return QuantizedLinear(in_f, out_f, header, tensors, b)


def test_compensation_lowers_the_output_error_of_rounding_each_column_alone():
    w, gram = correlated_layer(48, 96)
    config = KashinGPTQ(bits=3)
    w_hat = KashinGPTQ.dequantize(*config.stored_form(w, "l", gram))
    # no coupling between inputs: nothing to compensate through, each column rounded on its own
    alone = KashinGPTQ.dequantize(*config.stored_form(w, "l", torch.diag(gram.diagonal())))
    assert output_error(w, w_hat, gram) < 0.7 * output_error(w, alone, gram)


def test_a_column_alone_is_the_closed_codebook_of_that_column():
    w, gram = correlated_layer(32, 12, seed=2)
    tensors, header = KashinGPTQ(bits=2, sweeps=3).stored_form(w, "l", torch.diag(gram.diagonal()))
    P = Transform("dct", 32, 0)
    signs, doms, coef = closed_form(w.T.contiguous(), P, 2, 3)
    expected = torch.einsum("kvn,vk->vn", torch.where(doms[..., None], P.apply(signs), signs), coef).T
    got = KashinGPTQ.dequantize(tensors, header)
    assert header["vectors"] == "columns" and header["group_size"] == 32
    assert torch.allclose(got, expected, atol=0.02 * float(expected.abs().max()))  # 8-bit step sizes: ~1 % each


def test_the_stored_bytes_are_the_honest_count():
    out_f, in_f, bits = 64, 40, 3
    w, gram = correlated_layer(out_f, in_f)
    tensors, _ = KashinGPTQ(bits=bits).stored_form(w, "l", gram)
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    per_column = (bits * 8 + bits) / 8  # 8-bit step sizes and one domain bit per step
    assert nbytes == pytest.approx(out_f * in_f * bits / 8 + in_f * per_column + 8 + 8, abs=1)


@pytest.mark.parametrize("bits,out_f,in_f,transform", [
    (2, 64, 48, "dct"), (3, 96, 32, "random"), (4, 40, 24, "dct"), (3, 31, 20, "dct"),  # odd: no table route
    (2, ACTIVATION_DENSE_MAX + 88, 16, "dct")])  # long columns: P by FFT after the kernel's two sums
@pytest.mark.parametrize("tokens", [1, 3, 13, 70])  # table, table, middle, weight route
def test_every_route_computes_the_decoded_weight(ops, bits, out_f, in_f, transform, tokens):
    layer = layer_of(KashinGPTQ(bits=bits, transform=transform), out_f, in_f)
    w = layer.dequantize()
    x = torch.randn(2, tokens, in_f)
    ref = x @ w.T + layer.bias
    with torch.no_grad():
        for kernel in ("native", "decode"):
            layer.kernel = kernel
            y = layer(x)
            assert y.shape == ref.shape
            assert float((y - ref).abs().max() / ref.abs().max()) < 1e-5, kernel


def test_the_portable_build_matches_the_vector_one(ops):
    portable = native.build("DEFAULT")
    for bits, out_f in ((3, 64), (4, 40), (2, ACTIVATION_DENSE_MAX + 88)):
        layer = layer_of(KashinGPTQ(bits=bits), out_f, 24, bias=False)
        for tokens in (2, 20):  # the table route and the middle one
            x = torch.randn(tokens, 24)
            with torch.no_grad():
                layer._native_fn = None
                vector = layer(x)
                layer._native_fn = layer._method.native_linear(portable, layer.codes, layer.runtime_tensors(),
                                                               layer.header, layer.bias)
                assert float((layer(x) - vector).abs().max() / vector.abs().max()) < 1e-5


def test_a_wrong_input_width_is_named():
    layer = layer_of(KashinGPTQ(bits=3), 16, 8)
    for kernel in ("native", "decode"):
        layer.kernel = kernel
        with torch.no_grad(), pytest.raises((LeanformerError, RuntimeError), match="8"):
            layer(torch.randn(3, 9))


def test_bad_fields_are_refused():
    with pytest.raises(LeanformerError, match="bits=5"):
        KashinGPTQ(bits=5)
    with pytest.raises(LeanformerError, match="transform"):
        KashinGPTQ(transform="hadamard")
    with pytest.raises(LeanformerError, match="damp"):
        KashinGPTQ(damp=1.5)


def test_a_model_quantizes_saves_and_loads(make_tiny_llama, tokenizer, tmp_path):
    model = make_tiny_llama(layers=2, vocab_size=tokenizer.vocab_size).eval()
    quantized = copy.deepcopy(model)
    config = KashinGPTQ(bits=3, calibration=TEXTS, tokenizer=tokenizer, tokens=512)
    report = lf.quantize(quantized, config, progress=False)
    assert len(report.quantized) == 14 and not report.skipped
    assert all(q.header["vectors"] == "columns" for q in quantized_layers(quantized).values())
    ids = torch.randint(0, tokenizer.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    logits = quantized(ids).logits
    assert torch.nn.functional.cosine_similarity(logits.flatten(), model(ids).logits.flatten(), dim=0) > 0.9
    lf.save(quantized, tokenizer, tmp_path / "kg")
    loaded, _ = lf.load(tmp_path / "kg")
    assert torch.equal(loaded(ids).logits, logits)
    assert "calibration" not in config.to_dict()


def test_on_real_weights_it_keeps_the_outputs_closer_than_kashin_and_gptq_at_two_bits():
    """MiniLM's first block, its inputs from real text: at 2 bits the compensated columns leave less output error
    than data-free Kashin on rows and than GPTQ with its compact per-row grids (both stored in fewer bytes)."""
    model, tok = lf.load("minilm")
    names = ["encoder.layer.0.attention.self.query", "encoder.layer.0.output.dense"]
    modules = {n: model.get_submodule(n) for n in names}
    config = KashinGPTQ(bits=2, tokenizer=tok, tokens=1024)
    grams = measure_inputs(model, modules, calibration_batches(TEXTS * 8, tok, config, "t"), False, False, "t")[0]
    gptq = lf.GPTQ(bits=2, group_size=None, scale_bits=8, zero_point="integer", clip=True)
    for n in names:
        w, gram = modules[n].weight.detach(), grams[n]
        ours = output_error(w, KashinGPTQ.dequantize(*config.stored_form(w, n, gram)), gram)
        assert ours < 0.8 * output_error(w, Kashin.dequantize(*Kashin(bits=2).stored_form(w, n)), gram), n
        assert ours < 0.9 * output_error(w, lf.GPTQ.dequantize(*gptq.stored_form(w, n, gram)), gram), n


def test_cli_compresses_with_calibration_text(tiny_llama_dir, tmp_path, capsys):
    text = tmp_path / "calibration.txt"
    text.write_text("\n".join(TEXTS))
    assert main(["compress", str(tiny_llama_dir), "--method", "kashin-gptq", "--bits", "2", "--text", str(text),
                 "--out", str(tmp_path / "q")]) == 0
    assert "kashin-gptq" in capsys.readouterr().out
    loaded, _ = lf.load(tmp_path / "q")
    assert {q.method for q in quantized_layers(loaded).values()} == {"kashin-gptq"}

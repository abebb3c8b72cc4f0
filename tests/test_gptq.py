"""GPTQ: error-compensated rounding onto RTN's stored form, calibrated on the layers' own inputs."""
from __future__ import annotations

import copy
import json

import pytest
import torch

import leanformer as lf
from leanformer.cli import main
from leanformer.compress.calibration import calibration_batches, measure_inputs
from leanformer.compress.gptq import GPTQ
from leanformer.compress.packing import unpack_codes
from leanformer.compress.plan import QuantPlan
from leanformer.compress.quantization import QuantizedLinear, quantized_layers
from leanformer.compress.rtn import minmax_grid
from leanformer.errors import LeanformerError
from leanformer.files import load_json

TEXTS = [f"Story {i}: the little fox ran over the hill, found a river, and sat down to watch the boats." for i in
         range(24)]

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def correlated_layer(out_f: int, in_f: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight and the Gram matrix of inputs whose features are strongly correlated (as activations are)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * in_f, in_f, generator=g) @ torch.randn(in_f, in_f, generator=g)
    return torch.randn(out_f, in_f, generator=g), x.double().T @ x.double()


def output_error(w: torch.Tensor, w_hat: torch.Tensor, gram: torch.Tensor) -> float:
    d = (w - w_hat).double()
    return float(((d @ gram) * d).sum() / ((w.double() @ gram) * w.double()).sum())


def reference_codes(w: torch.Tensor, gram: torch.Tensor, bits: int, g: int, act_order: bool,
                    damp: float = 0.01) -> torch.Tensor:
    """Algorithm 1 of the paper without lazy batches: after each column, every later column is updated."""
    h = gram.clone()
    h.diagonal()[h.diagonal() == 0] = 1
    order = torch.argsort(h.diagonal(), descending=True, stable=True) if act_order else torch.arange(len(h))
    h = h[order][:, order]
    h += damp * h.diagonal().mean() * torch.eye(len(h), dtype=h.dtype)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    work, codes = w.double()[:, order].clone(), torch.zeros(w.shape, dtype=torch.long)
    static = [minmax_grid(w[:, i:i + g], bits) for i in range(0, w.shape[1], g)]
    grid = None
    for j in range(w.shape[1]):
        col = int(order[j])
        if act_order:
            grid = static[col // g]
        elif col % g == 0:
            grid = minmax_grid(work[:, j:j + g].float(), bits)
        s, z = grid[0][:, 0].double(), grid[1][:, 0].double()
        q = ((work[:, j] - z) / s).round().clamp(0, 2 ** bits - 1)
        codes[:, col] = q.long()
        err = (work[:, j] - (q * s + z)) / u[j, j]
        work[:, j:] -= err[:, None] * u[j, j:]
    return codes


@pytest.mark.parametrize("act_order,group", [(True, 16), (False, 16), (True, None), (False, 48)])
def test_compensated_rounding_lowers_the_output_error_of_rtn_on_the_same_stored_form(act_order, group):
    w, gram = correlated_layer(40, 192)
    rtn_t, rtn_h = lf.RTN(bits=3, group_size=group).stored_form(w, "l")
    gptq_t, gptq_h = GPTQ(bits=3, group_size=group, act_order=act_order).stored_form(w, "l", gram)
    assert {k: (v.shape, v.dtype) for k, v in gptq_t.items()} == {k: (v.shape, v.dtype) for k, v in rtn_t.items()}
    w_hat = GPTQ.dequantize(gptq_t, gptq_h)
    assert torch.equal(w_hat, lf.RTN.dequantize(gptq_t, {**gptq_h, "method": "rtn"}))  # RTN's form, read alike
    assert output_error(w, w_hat, gram) < 0.7 * output_error(w, lf.RTN.dequantize(rtn_t, rtn_h), gram)


@pytest.mark.parametrize("act_order,group", [(True, 16), (False, 48), (False, None)])
def test_lazy_batches_round_as_the_column_by_column_algorithm(act_order, group):
    w, gram = correlated_layer(24, 192, seed=1)  # 192 inputs: more than one lazy batch of 128
    tensors, header = GPTQ(bits=3, group_size=group, act_order=act_order).stored_form(w, "l", gram)
    codes = unpack_codes(tensors["packed"], 3, w.numel()).view(w.shape).long()
    expected = reference_codes(w, gram, 3, group or 192, act_order)
    assert (codes == expected).float().mean() > 0.995  # float32 against float64: a rare tie may round apart


def test_without_input_correlation_it_rounds_as_rtn():
    w, _ = correlated_layer(16, 64)
    gram = torch.diag(torch.rand(64, dtype=torch.float64) + 0.5)  # no coupling: nothing to compensate through
    gram[3, 3] = 0.0  # an input calibration never reached keeps its weight, rounded
    rtn = lf.RTN(bits=4, group_size=16).stored_form(w, "l")[0]
    for act_order in (True, False):
        assert torch.equal(GPTQ(bits=4, group_size=16, act_order=act_order).stored_form(w, "l", gram)[0]["packed"],
                           rtn["packed"])


def grams_on(model, names, config) -> dict[str, torch.Tensor]:
    modules = {n: model.get_submodule(n) for n in names}
    return measure_inputs(model, modules, calibration_batches(TEXTS, config.tokenizer, config, "t"), False, False, "t")[0]


def test_quantize_reads_its_calibration_and_the_model_round_trips(make_tiny_llama, tokenizer, tmp_path):
    model = make_tiny_llama(layers=2, vocab_size=tokenizer.vocab_size)
    model.train()  # the Hessians are measured in eval mode whatever mode the model is in
    config = GPTQ(bits=4, group_size=16, calibration=TEXTS, tokenizer=tokenizer, tokens=512, sequential=False)
    quantized = copy.deepcopy(model)
    with pytest.warns(UserWarning, match="GPTQ: the calibration gave"):  # 600 tokens is under a quarter of 4096
        lf.quantize(copy.deepcopy(model), GPTQ(bits=4, group_size=16, calibration=TEXTS, tokenizer=tokenizer),
                    progress=False)
    report = lf.quantize(quantized, config, progress=False)
    assert quantized.training and len(report.quantized) == 14 and not report.skipped
    layers = quantized_layers(quantized)
    grams = grams_on(model.eval(), list(layers), config)  # sequential=False: all from the full-precision model
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        expected, _ = config.stored_form(model.get_submodule(name).weight.detach(), name, grams[name])
        assert torch.equal(layers[name].stored_tensors()["packed"], expected["packed"])
    ids = torch.randint(0, tokenizer.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    quantized.eval()
    logits = quantized(ids).logits
    lf.save(quantized, tokenizer, tmp_path / "gptq")
    loaded, _ = lf.load(tmp_path / "gptq")
    assert torch.equal(loaded(ids).logits, logits)
    assert "calibration" not in config.to_dict() and "tokenizer" not in config.to_dict()
    assert lf.size_report(loaded).total["bits_per_weight"] == pytest.approx(4 + 32 / 16)


def test_sequential_measures_each_stage_on_the_model_quantized_so_far(make_tiny_llama, tokenizer):
    model = make_tiny_llama(layers=2, vocab_size=tokenizer.vocab_size).eval()
    config = GPTQ(bits=3, group_size=16, calibration=TEXTS, tokenizer=tokenizer, tokens=512)
    assert config.sequential  # the reference's order is the default
    quantized = copy.deepcopy(model)
    lf.quantize(quantized, config, progress=False)
    layers = quantized_layers(quantized)
    first, last = "model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj"
    full = grams_on(model, [first, last], config)
    # the last stage's input passes only through layers quantized before it: the finished model gives it exactly
    after = grams_on(quantized, [last], config)
    for name, gram in ((first, full[first]), (last, after[last])):
        expected, _ = config.stored_form(model.get_submodule(name).weight.detach(), name, gram)
        assert torch.equal(layers[name].stored_tensors()["packed"], expected["packed"]), name
    stale, _ = config.stored_form(model.get_submodule(last).weight.detach(), last, full[last])
    assert not torch.equal(layers[last].stored_tensors()["packed"], stale["packed"])


def test_missing_calibration_is_named_and_leaves_the_model_alone(make_tiny_llama, tokenizer):
    model = make_tiny_llama(layers=1, vocab_size=tokenizer.vocab_size)
    with pytest.raises(LeanformerError, match="GPTQ needs calibration input"):
        lf.quantize(model, GPTQ(bits=4, group_size=16), progress=False)
    with pytest.raises(LeanformerError, match="GPTQ needs the model's tokenizer"):
        lf.quantize(model, GPTQ(bits=4, group_size=16, calibration=TEXTS), progress=False)
    assert not quantized_layers(model)
    with pytest.raises(LeanformerError, match="damp must be in"):
        GPTQ(damp=1.5)
    with pytest.raises(LeanformerError, match="Gram matrix is"):
        GPTQ(bits=4, group_size=16).stored_form(torch.randn(8, 32), "l", torch.eye(16))


def test_plan_hands_gptq_its_gram_matrices(make_tiny_llama, tokenizer):
    model = make_tiny_llama(layers=2, vocab_size=tokenizer.vocab_size)
    candidates = [GPTQ(bits=2, group_size=16, sequential=False), GPTQ(bits=4, group_size=16, sequential=False),
                  lf.RTN(bits=4, group_size=16)]
    plan = lf.plan(model, 5.0, calibration=TEXTS, tokenizer=tokenizer, candidates=candidates, progress=False,
                   tokens=512)
    rows = plan.table["model.layers.0.mlp.up_proj"]["candidates"]
    assert rows["gptq4/g16 sequential=False"]["output_error"] < rows["rtn4/g16"]["output_error"]  # compensated
    quantized = copy.deepcopy(model)
    lf.quantize(quantized, plan, progress=False)
    layers = quantized_layers(quantized)
    assert {n: f"{m.method}{m.header['bits']}/g16" for n, m in layers.items()} == \
        {n: label.split()[0] for n, label in plan.layers.items()}
    assert lf.size_report(quantized).total["bits_per_weight"] == pytest.approx(plan.average_bits)
    name = next(n for n, label in plan.layers.items() if label.startswith("gptq"))
    expected, _ = plan.candidates[plan.layers[name]].stored_form(model.get_submodule(name).weight.detach(), name,
                                                                  plan.grams[name])
    assert torch.equal(layers[name].stored_tensors()["packed"], expected["packed"])  # not sequential: the plan's grams
    again = QuantPlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    with pytest.raises(LeanformerError, match="run lf.plan again"):
        lf.quantize(copy.deepcopy(model), again, progress=False)
    with pytest.raises(LeanformerError, match="carries its own calibration"):
        lf.plan(model, 5.0, calibration=TEXTS, tokenizer=tokenizer, progress=False,
                candidates=[GPTQ(bits=4, group_size=16, calibration=TEXTS)])


def test_plan_rounds_sequential_gptq_layers_last_on_the_model_quantized_so_far(make_tiny_llama, tokenizer):
    model = make_tiny_llama(layers=2, vocab_size=tokenizer.vocab_size).eval()
    # 6 and 4 bits per weight: a budget of 5 must mix them
    plan = lf.plan(model, 5.0, calibration=TEXTS, tokenizer=tokenizer, progress=False, tokens=512,
                   candidates=[GPTQ(bits=4, group_size=16), lf.RTN(bits=2, group_size=16)])
    chosen = {label.split("/")[0] for label in plan.layers.values()}
    assert {"gptq4", "rtn2"} <= chosen, plan.layers  # both kinds, so the order matters
    assert plan.grams is None and plan.calibration  # a sequential candidate needs the batches, not the plan's grams
    quantized = copy.deepcopy(model)
    lf.quantize(quantized, plan, progress=False)
    layers = quantized_layers(quantized)
    gptq_layers = [n for n in layers if layers[n].method == "gptq"]
    last = gptq_layers[-1]  # the last GPTQ stage in forward order: nothing after it is still full precision upstream
    config = GPTQ(bits=layers[last].header["bits"], group_size=16, tokenizer=tokenizer, tokens=512)
    expected, _ = config.stored_form(model.get_submodule(last).weight.detach(), last,
                                     grams_on(quantized, [last], config)[last])
    assert torch.equal(layers[last].stored_tensors()["packed"], expected["packed"])


def test_cli_gptq_reads_calibration_text(tiny_llama_dir, tmp_path, capsys):
    text = tmp_path / "calib.txt"
    text.write_text("\n\n".join(TEXTS))
    out = tmp_path / "gptq"
    assert main(["compress", str(tiny_llama_dir), "--method", "gptq", "--bits", "3", "--group-size", "16",
                 "--no-act-order", "--text", str(text), "--tokens", "512", "--out", str(out)]) == 0
    model, _ = lf.load(out)
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert layers and all(m.method == "gptq" and m.header["bits"] == 3 for m in layers)
    saved = [json.dumps(load_json(f)) for f in out.glob("*.json")]
    assert any('"gptq"' in s for s in saved) and not any("calibration" in s or "Story 1" in s for s in saved)

    planned = tmp_path / "planned"  # a plan restricted to GPTQ gets the plan's own Gram matrices
    assert main(["compress", str(tiny_llama_dir), "--target-bits", "4.6", "--method", "gptq", "--group-size", "16",
                 "--text", str(text), "--tokens", "512", "--out", str(planned)]) == 0
    plan = load_json(planned / "plan.json")
    assert list(plan["candidates"]) == ["gptq2/g16", "gptq3/g16", "gptq4/g16"] and plan["average_bits"] <= 4.6
    model, _ = lf.load(planned)
    assert lf.size_report(model).total["bits_per_weight"] == pytest.approx(plan["average_bits"])

    def err(*argv):
        assert main(["compress", str(tiny_llama_dir), *argv, "--out", str(tmp_path / "x")]) == 2
        return capsys.readouterr().err

    assert "--text only apply with --target-bits (or a calibrated --method: gptq, kashin-gptq)" in err("--method", "rtn", "--text",
                                                                                        str(text))
    assert "--sensitivity only apply with --target-bits" in err("--method", "gptq", "--sensitivity", "layer")
    assert "--damp must be in" in err("--method", "gptq", "--damp", "2")
    assert not (tmp_path / "x").exists()


def test_a_failure_midway_puts_every_replaced_layer_back(make_tiny_llama, tokenizer, monkeypatch):
    model = make_tiny_llama(layers=2, vocab_size=tokenizer.vocab_size).eval()
    ids = torch.randint(0, tokenizer.vocab_size, (1, 7), generator=torch.Generator().manual_seed(0))
    before = model(ids).logits
    calls = []
    real = GPTQ.quantize_weight

    def fail_on_the_ninth(self, weight, name, gram):
        calls.append(name)
        if len(calls) == 9:
            raise RuntimeError("out of memory")
        return real(self, weight, name, gram)

    monkeypatch.setattr(GPTQ, "quantize_weight", fail_on_the_ninth)
    with pytest.raises(RuntimeError, match="out of memory"):
        lf.quantize(model, GPTQ(bits=3, group_size=16, calibration=TEXTS, tokenizer=tokenizer, tokens=512),
                    progress=False)
    assert len(calls) == 9 and not quantized_layers(model)
    assert torch.equal(model(ids).logits, before)

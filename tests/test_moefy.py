"""Dense → dynamic-k MoE (lf.moefy): dense equivalence at τ = 1, fewer executed FLOPs and graceful
degradation below, experts truly skipped, the routing rules, save/load, the sparsity phase, errors,
and the `moefy` / `eval --tau` commands, on tiny random BERT and Llama models."""
from __future__ import annotations

import copy
import json
import random

import pytest
import torch
from torch import nn
from transformers import TrainingArguments

import leanformer as lf
from leanformer import dynamic
from leanformer.cli import main
from leanformer.dynamic.flops import dense_flops_per_token
from leanformer.dynamic.moe import MoEMLP, balanced_kmeans, moe_layers, set_top_k
from leanformer.errors import LeanformerError
from leanformer.tasks import Split, Task
from leanformer.train.regularizers import ActivationSparsity, square_hoyer

WORDS = "the cat sat on a mat while two dogs ran far away from the old red barn near it".split()


def corpus(n: int = 60, seed: int = 0) -> list[str]:
    r = random.Random(seed)
    return [" ".join(r.choice(WORDS) for _ in range(r.randint(8, 20))) for _ in range(n)]


CONFIG = dict(experts=8, router_width=8, tokens=768, router_epochs=3, router_batch_size=128, max_seq_length=32,
              kmeans_iters=5)


def batch(tokenizer, n: int = 6):
    return tokenizer(corpus(n, seed=1), padding=True, truncation=True, max_length=24, return_tensors="pt")


@pytest.fixture(scope="module", params=["bert", "llama"])
def moefied(request, tokenizer, make_tiny_bert, make_tiny_llama):
    def make():
        if request.param == "bert":
            return make_tiny_bert(layers=2, vocab_size=tokenizer.vocab_size, head="sequence-classification")
        return make_tiny_llama(layers=2, vocab_size=tokenizer.vocab_size)
    model, dense = make(), make()
    lf.moefy(model, lf.DSTI(tau=1.0, **CONFIG), tokenizer=tokenizer, calibration=corpus())
    return model, dense


@pytest.fixture
def pair(moefied):
    """(moefied model, the same dense model) — BERT classifier or Llama LM over minilm's vocabulary; a fresh
    copy for each test (moefied once per module)."""
    return copy.deepcopy(moefied[0]), moefied[1]


@torch.no_grad()
def logits(model, enc):
    return model(**enc).logits


@pytest.mark.parametrize("rule", ["dynk_max", "dynk"])
def test_tau_one_is_the_dense_model(pair, tokenizer, rule):
    model, dense = pair
    lf.dynamic.moe.set_rule(model, rule)
    enc = batch(tokenizer)
    dynamic.set_tau(model, 1.0)
    dynamic.reset_cost(model)
    torch.testing.assert_close(logits(model, enc), logits(dense, enc), rtol=1e-5, atol=1e-5)
    c = dynamic.cost(model)
    assert c["mlp_flops_per_token"] == 1.0 and c["flops_per_token"] == 1.0 and c["expert_fraction"] == 1.0
    assert c["tokens"] == enc["input_ids"].numel()


def test_lower_tau_executes_fewer_flops_and_degrades_gracefully(pair, tokenizer):
    model, dense = pair
    enc = batch(tokenizer)
    reference = logits(dense, enc)
    rows = []
    for tau in (1.0, 0.8, 0.5, 0.0):
        dynamic.set_tau(model, tau)
        dynamic.reset_cost(model)
        error = (logits(model, enc) - reference).norm() / reference.norm()
        rows.append((tau, dynamic.cost(model), float(error)))
    experts = [c["experts_per_token"] for _, c, _ in rows]
    assert experts == sorted(experts, reverse=True) and experts[-1] == 1.0  # τ = 0: one expert per token
    assert rows[-1][1]["mlp_flops_per_token"] < 0.5
    assert rows[0][2] < 1e-5 and rows[1][2] < rows[-1][2]  # closer to dense at higher τ
    assert all(0 < c["flops_per_token"] < 1 for _, c, _ in rows[1:] if c["expert_fraction"] < 0.7)


def test_skipped_experts_are_not_computed(pair, tokenizer):
    model, _ = pair
    dynamic.set_tau(model, 0.3)
    enc = batch(tokenizer)
    counts = []
    for m in moe_layers(model):
        m.register_forward_pre_hook(lambda m, args: counts.append(
            m.select(m.predicted_norms(args[0].reshape(-1, m.d_in))).sum(0)))
    dynamic.reset_cost(model)
    before = logits(model, enc)
    first = moe_layers(model)[0]
    assert first.last_run == [(e, int(c)) for e, c in enumerate(counts[0]) if c > 0]
    assert first.rows_run == int(counts[0].sum()) < enc["input_ids"].numel() * first.experts
    # poison every expert no token chose: computing it at all (even masked) would spread the NaNs
    skipped = 0
    with torch.no_grad():
        for m, c in zip(moe_layers(model), counts):
            for e in (c == 0).nonzero().flatten().tolist():
                m.w_in[e] = float("nan")
                m.w_out[e] = float("nan")
                skipped += 1
    assert skipped > 0
    torch.testing.assert_close(logits(model, enc), before)


def test_experts_that_do_not_divide_the_width_differ_by_one_neuron(tokenizer, make_tiny_llama):
    model, dense = (make_tiny_llama(layers=1, vocab_size=tokenizer.vocab_size) for _ in range(2))
    lf.moefy(model, lf.DSTI(**{**CONFIG, "experts": 6}, tau=1.0), tokenizer=tokenizer, calibration=corpus())
    moe = moe_layers(model)[0]
    assert moe.sizes.tolist() == [11, 11, 11, 11, 10, 10] and (moe.neurons >= 0).sum() == 64
    assert sorted(moe.neurons[moe.neurons >= 0].tolist()) == list(range(64))  # every neuron once
    enc = batch(tokenizer)
    torch.testing.assert_close(logits(model, enc), logits(dense, enc), rtol=1e-5, atol=1e-5)
    set_top_k(model, 1)
    dynamic.reset_cost(model)
    logits(model, enc)
    c = dynamic.cost(model)
    router = moe.router_flops / (64 * moe.neuron_flops)
    assert 10 / 64 + router <= c["mlp_flops_per_token"] <= 11 / 64 + router  # real neurons counted, not padding


def test_routing_rules_on_known_norms():
    moe = MoEMLP(4, 4, 4, 8, False, False, False, nn.ReLU(), 8)
    norms = torch.tensor([[4.0, 3.0, 2.0, 1.0], [0.0, 0.0, 5.0, 0.0]])
    cases = {("dynk_max", 0.5): [[1, 1, 1, 0], [0, 0, 1, 0]], ("dynk_max", 0.0): [[1, 0, 0, 0], [0, 0, 1, 0]],
             ("dynk", 0.5): [[1, 1, 0, 0], [0, 0, 1, 0]], ("dynk", 0.75): [[1, 1, 1, 0], [0, 0, 1, 0]],
             ("dynk", 0.0): [[1, 0, 0, 0], [0, 0, 1, 0]], ("dynk", 1.0): [[1, 1, 1, 1], [1, 1, 1, 1]],
             ("topk", 0.9): [[1, 1, 0, 0], [0, 1, 1, 0]]}
    moe.k = 2
    for (rule, tau), want in cases.items():
        moe.rule, moe.tau = rule, tau
        got = moe.select(norms).int().tolist()
        if rule == "topk":  # ties among zeros: the top one is fixed, the other any zero-norm expert
            assert got[0] == want[0] and got[1][2] == 1 and sum(got[1]) == 2
        else:
            assert got == want, (rule, tau)


def test_balanced_kmeans_gives_equal_groups_that_follow_the_data():
    torch.manual_seed(0)
    centres = torch.randn(4, 16) * 5
    points = torch.cat([c + 0.1 * torch.randn(6, 16) for c in centres])[torch.randperm(24)]
    labels = balanced_kmeans(points, 4, iters=10)
    assert torch.bincount(labels, minlength=4).tolist() == [6, 6, 6, 6]
    near = (nn.functional.normalize(points, dim=1) @ nn.functional.normalize(centres, dim=1).t()).argmax(1)
    for c in range(4):  # each cluster is one planted group
        assert len(set(near[labels == c].tolist())) == 1


def test_static_top_k_and_flops_accounting(pair, tokenizer):
    model, dense = pair
    set_top_k(model, 2)
    dynamic.reset_cost(model)
    enc = batch(tokenizer)
    logits(model, enc)
    c = dynamic.cost(model)
    moe = moe_layers(model)[0]
    n = enc["input_ids"].numel()
    assert c["experts_per_token"] == 2.0
    expert = moe.expert_size * moe.neuron_flops  # 8 neurons each
    assert c["mlp_flops_per_token"] == pytest.approx((2 * expert + moe.router_flops) / (8 * expert))
    flops = dense_flops_per_token(model, enc["input_ids"].shape[1])
    assert flops["mlp"] == dense_flops_per_token(dense, enc["input_ids"].shape[1])["mlp"]  # dense reference kept
    executed = flops["attention"] + len(moe_layers(model)) * (2 * expert + moe.router_flops)
    assert c["flops_per_token"] == pytest.approx(executed / flops["total"]) and c["tokens"] == n


def test_save_and_load_round_trip(pair, tokenizer, tmp_path):
    model, _ = pair
    dynamic.set_tau(model, 0.5)
    enc = batch(tokenizer)
    before = logits(model, enc)
    lf.save(model, tokenizer, tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "leanformer.json").read_text())
    assert [t["transform"] for t in meta["transforms"]] == ["moefy"]
    loaded, _ = lf.load(tmp_path / "m")
    dynamic.set_tau(loaded, 0.5)
    torch.testing.assert_close(logits(loaded, enc), before)
    assert torch.equal(moe_layers(loaded)[0].neurons, moe_layers(model)[0].neurons)
    # onto another base: refused
    with pytest.raises(LeanformerError, match="stores its base weights"):
        lf.load(tmp_path / "m", base=pair[1])
    meta["base"]["config"]["intermediate_size"] = 48
    (tmp_path / "m" / "leanformer.json").write_text(json.dumps(meta))
    with pytest.raises(LeanformerError, match=r"was made from a base whose MLP .* has \(input, width, output\) "
                                              r"\(32, 64, 32\); this base.s has \(32, 48, 32\)"):
        lf.load(tmp_path / "m")


def test_bad_input_errors(tokenizer, make_tiny_bert):
    model = make_tiny_bert(layers=1, vocab_size=tokenizer.vocab_size)
    with pytest.raises(LeanformerError, match=r"experts=65 is more than the 64 neurons of the MLP at .*use at most 64"):
        lf.moefy(model, lf.DSTI(experts=65), tokenizer=tokenizer, calibration=corpus())
    with pytest.raises(LeanformerError, match=r"τ must be in \[0, 1\], got 1.5"):
        lf.DSTI(tau=1.5)
    with pytest.raises(LeanformerError, match="not a dynamic-inference model.*moefy"):
        dynamic.set_tau(model, 0.5)
    with pytest.raises(LeanformerError, match="no recognisable MLP: looked for an MLP input layer"):
        lf.moefy(nn.Sequential(nn.Linear(4, 4)), lf.DSTI(experts=2), tokenizer=tokenizer, calibration=corpus())
    report = lf.moefy(model, lf.DSTI(**{**CONFIG, "experts": None}), tokenizer=tokenizer, calibration=corpus())
    assert report["experts"] == 3 and report["neurons_per_expert"] == [22, 21, 21]  # default: ≈ 24 neurons each
    with pytest.raises(LeanformerError, match=r"τ must be in \[0, 1\], got -0.1"):
        dynamic.set_tau(model, -0.1)
    with pytest.raises(LeanformerError, match="already moefied"):
        lf.moefy(model, lf.DSTI(**CONFIG), tokenizer=tokenizer, calibration=corpus())


def test_sparsity_phase_relu_switch_and_regulariser(tokenizer, make_tiny_bert, tmp_path):
    assert float(square_hoyer(torch.tensor([0.0, 3.0, 0.0, 0.0]))) == pytest.approx(1.0)
    assert float(square_hoyer(torch.ones(8))) == pytest.approx(8.0)
    reg = ActivationSparsity("hoyer", 0.1, warmup=0.5)
    assert [reg.weight_at(s, 10) for s in (0, 2, 5, 9)] == pytest.approx([0.0, 0.04, 0.1, 0.1])
    with pytest.raises(LeanformerError, match="not one of hoyer, l1"):
        ActivationSparsity("l2")
    r = random.Random(0)
    rows = [(" ".join(r.choice(WORDS) for _ in range(6)), r.randint(0, 1)) for _ in range(48)]
    split = Split([a for a, _ in rows], None, [y for _, y in rows])
    task = Task("toy", split, split, ["0", "1"], ("accuracy",))
    model = make_tiny_bert(layers=2, vocab_size=tokenizer.vocab_size, head="sequence-classification")
    args = TrainingArguments(output_dir=str(tmp_path / "ck"), max_steps=4, per_device_train_batch_size=16,
                             learning_rate=1e-3, save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=True)
    m = lf.finetune(model, tokenizer, task, args, method="full", relu_mlp=True,
                    sparsity_reg=ActivationSparsity("hoyer", 1e-2, warmup=0.0))
    assert 1.0 <= m["sparsity_reg"] <= 64 and 0.2 < m["mlp_zero_fraction"] < 1.0  # ReLU: many exact zeros
    assert isinstance(model.bert.encoder.layer[0].intermediate.intermediate_act_fn, nn.ReLU)
    lf.save(model, tokenizer, tmp_path / "relu")
    loaded, _ = lf.load(tmp_path / "relu")
    assert isinstance(loaded.bert.encoder.layer[1].intermediate.intermediate_act_fn, nn.ReLU)
    enc = batch(tokenizer)
    torch.testing.assert_close(logits(loaded, enc), logits(model.eval(), enc))
    # the D2DMoE pipeline: sparsified model → moefy (its ReLU experts) → save → load
    lf.moefy(loaded, lf.DSTI(**CONFIG, tau=0.6), tokenizer=tokenizer, calibration=corpus())
    assert isinstance(moe_layers(loaded)[0].act, nn.ReLU)
    lf.save(loaded, tokenizer, tmp_path / "relu-moe")
    again, _ = lf.load(tmp_path / "relu-moe")
    assert [e.transform for e in lf.applied(again)] == ["relu_mlp", "moefy"]
    torch.testing.assert_close(logits(again, enc), logits(loaded, enc))


def test_moefy_and_eval_tau_commands(tiny_llama_dir, tmp_path, capsys):
    text = tmp_path / "calib.txt"
    text.write_text("\n".join(corpus(36)))
    out = tmp_path / "moe"
    assert main(["moefy", str(tiny_llama_dir), "--text", str(text), "--experts", "8", "--tau", "0.5", "--tokens",
                 "512", "--router-epochs", "1", "--kmeans-iters", "3", "--router-batch-size", "128",
                 "--max-seq-length", "32",
                 "--out", str(out)]) == 0
    assert json.loads((out / "moefy.json").read_text())["layers"][0]["experts_per_token"] <= 8
    assert main(["eval", str(out), "--text", str(text), "--max-seq-length", "32", "--tau", "0.5",
                 "--out", str(tmp_path / "e1")]) == 0
    m = json.loads((tmp_path / "e1" / "metrics.json").read_text())
    assert m["tau"] == 0.5 and 0 < m["mlp_flops_per_token"] < 1.5 and m["perplexity"] > 1 and m["latency_seconds"] > 0
    assert main(["eval", str(out), "--text", str(text), "--max-seq-length", "32", "--tau-sweep", "1", "0",
                 "--out", str(tmp_path / "e2")]) == 0
    m = json.loads((tmp_path / "e2" / "metrics.json").read_text())
    assert [r["tau"] for r in m["sweep"]] == [1.0, 0.0] and m["sweep"][0]["mlp_flops_per_token"] == 1.0
    assert m["sweep"][1]["experts_per_token"] == 1.0
    assert (tmp_path / "e2" / "tau_sweep.png").stat().st_size > 1000
    assert "| τ | perplexity |" in (tmp_path / "e2" / "tau_sweep.md").read_text()
    capsys.readouterr()
    assert main(["eval", str(tiny_llama_dir), "--text", str(text), "--tau", "0.5"]) == 2
    assert "not a dynamic-inference model" in capsys.readouterr().err
    assert main(["eval", str(out), "--text", str(text), "--tau-sweep", "1", "1.2"]) == 2
    assert "τ must be in [0, 1], got 1.2" in capsys.readouterr().err
    assert main(["moefy", str(tiny_llama_dir), "--text", str(text), "--experts", "65",
                 "--out", str(tmp_path / "x")]) == 2
    assert "is more than the 64 neurons" in capsys.readouterr().err

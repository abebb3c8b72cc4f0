"""lf.plan: per-layer quantization chosen from measured sensitivity under an honest bits/weight budget."""
from __future__ import annotations

import copy
import itertools
import json
import random
import warnings

import pytest
import torch

import leanformer as lf
from leanformer.cli import main
from leanformer.compress.plan import PlanConfig, QuantPlan, allocate, candidate_label
from leanformer.compress.quantization import QuantizedLinear
from leanformer.files import load_json
from leanformer.inspection import Profile
from leanformer.tasks import Split, Task
from leanformer.text import batches, token_chunks

TEXTS = [f"Story {i}: the little fox ran over the hill, found a river, and sat down to watch the boats." for i in
         range(24)]
# Tiny layers are 32 or 64 wide: RTN with groups of 16 stores 2 + 2 = 4 or 4 + 2 = 6 bits per weight.
RTN_2_4 = [lf.RTN(bits=2, group_size=16), lf.RTN(bits=4, group_size=16)]


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def spent_bits(plan: QuantPlan) -> float:
    """Σ n_i · bits_i of the plan's choice, from its own table."""
    return sum(row["n_weights"] * (row["candidates"][plan.layers[n]]["bits"] if plan.layers[n]
                                   else row["full_precision_bits"]) for n, row in plan.table.items())


# ------------------------------------------------------------------------------ allocation


def test_allocate_never_exceeds_the_budget_and_lands_near_the_optimum():
    worst = 1.0
    for seed in range(60):
        r = random.Random(seed)
        n_items, n_options = r.randint(2, 5), r.randint(2, 4)
        costs = [[r.randint(1, 10) * w for _ in range(n_options)] for w in [r.randint(1, 5) for _ in range(n_items)]]
        errors = [[r.random() for _ in range(n_options)] for _ in range(n_items)]
        budget = r.uniform(sum(map(min, costs)), sum(map(max, costs)))
        choice = allocate(costs, errors, budget)
        assert sum(costs[i][j] for i, j in enumerate(choice)) <= budget
        feasible = [p for p in itertools.product(range(n_options), repeat=n_items)
                    if sum(costs[i][j] for i, j in enumerate(p)) <= budget]
        best = min(sum(errors[i][j] for i, j in enumerate(p)) for p in feasible)
        worst = max(worst, sum(errors[i][j] for i, j in enumerate(choice)) / best)
    assert worst < 1.15  # brute force on every instance: never more than 15 % above the optimum


def test_allocate_trades_an_upgrade_for_a_better_one_the_greedy_order_misses():
    # item 0's upgrade has the best error drop per bit but blocks item 1's far larger one: the optimum
    # takes item 1's upgrade alone (a paired move undoes item 0's)
    costs, errors = [[2, 3], [2, 6]], [[1.0, 0.0], [10.0, 6.5]]
    assert allocate(costs, errors, budget=8) == [0, 1]
    assert allocate(costs, errors, budget=5) == [1, 0]
    assert allocate(costs, errors, budget=4) == [0, 0]
    assert allocate(costs, errors, budget=8, eligible=[[0, 1], [0]]) == [1, 0]


def test_the_objective_is_the_sum_of_the_layers_errors_not_weighted_by_their_sizes():
    # a big layer (1,000 weights) and a small one (10): the budget fits one upgrade; the small layer's removes
    # 5 times more error (0.05 against 0.01), so it is the one taken, although the big layer's error summed
    # over its weights would drop more (10 against 0.5)
    def row(n, err_2, err_4):
        return {"n_weights": n, "full_precision_bits": 32.0, "importance": 1.0, "candidates": {
            "rtn2": {"bytes": n * 2 / 8, "bits": 2.0, "sensitivity": err_2},
            "rtn4": {"bytes": n * 4 / 8, "bits": 4.0, "sensitivity": err_4}}}
    table = {"big": row(1000, 0.02, 0.01), "small": row(10, 0.06, 0.01)}
    plan = QuantPlan(2.0, {"rtn2": lf.RTN(bits=2), "rtn4": lf.RTN(bits=4)}, {}, table, 0.0)
    budget = (2 * 1010 + 2 * 1000) / 1010  # room for the big layer's upgrade, so for either one
    assert plan.with_target(budget, sensitivity="layer").layers == {"big": "rtn2", "small": "rtn4"}


# ------------------------------------------------------------------------------ measurement


def test_output_error_is_measured_on_the_layers_calibration_inputs(make_tiny_llama, tokenizer):
    model = make_tiny_llama(layers=2, vocab_size=tokenizer.vocab_size)
    plan = lf.plan(model, 5.0, calibration=TEXTS, tokenizer=tokenizer, candidates=RTN_2_4, progress=False,
                   use_profile=False, sensitivity="layer")
    name = "model.layers.1.mlp.down_proj"
    layer = model.get_submodule(name)
    inputs = []
    handle = layer.register_forward_pre_hook(lambda _m, args: inputs.append(args[0]))
    for batch in batches(tokenizer, token_chunks(tokenizer, TEXTS, 128, 4096), 16):
        model(**batch)
        inputs[-1] = inputs[-1][batch["attention_mask"].bool()]
    handle.remove()
    x = torch.cat(inputs).detach().double()
    w = layer.weight.detach().double()
    tensors, header = RTN_2_4[0].quantize_weight(layer.weight.detach().float(), name)
    w_hat = lf.RTN.dequantize(tensors, {"method": "rtn", "bits": 2, "shape": list(w.shape), **header}).double()
    expected = float((x @ (w - w_hat).T).pow(2).sum() / (x @ w.T).pow(2).sum())
    row = plan.table[name]["candidates"]["rtn2/g16"]
    assert row["output_error"] == pytest.approx(expected, rel=1e-9)
    assert row["sensitivity"] == row["output_error"]  # use_profile=False: importance 1
    assert row["bits"] == 4.0 and plan.table[name]["candidates"]["rtn4/g16"]["bits"] == 6.0


def test_too_little_calibration_is_warned_about(make_tiny_bert, tokenizer):
    model = make_tiny_bert(layers=1, vocab_size=tokenizer.vocab_size)
    kwargs = dict(candidates=RTN_2_4, progress=False, use_profile=False, sensitivity="layer")
    with pytest.warns(UserWarning, match="calibration gave"):
        lf.plan(model, 5.0, calibration=TEXTS[:2], tokenizer=tokenizer, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # enough tokens for tokens=64: no warning of any kind
        lf.plan(model, 5.0, calibration=TEXTS[:4], tokenizer=tokenizer, tokens=64, **kwargs)


def test_calibration_texts_task_and_token_batches_measure_the_same(make_tiny_bert, tokenizer):
    model = make_tiny_bert(layers=2, vocab_size=tokenizer.vocab_size)
    kwargs = dict(candidates=RTN_2_4, progress=False, tokens=512)
    from_texts = lf.plan(model, 5.0, calibration=TEXTS, tokenizer=tokenizer, **kwargs)
    task = Task("t", Split(TEXTS, None, [0] * len(TEXTS)), Split(TEXTS[:2], None, [0, 0]), ["a", "b"])
    from_task = lf.plan(model, 5.0, calibration=task, **{**kwargs, "tokenizer": tokenizer})
    token_batches = list(batches(tokenizer, token_chunks(tokenizer, TEXTS, 128, 512), 16))
    from_batches = lf.plan(model, 5.0, calibration=token_batches, **kwargs)  # no tokenizer needed
    assert from_texts.table == from_task.table == from_batches.table
    assert from_texts.layers == from_batches.layers
    assert from_texts.info["calibration_tokens"] == 512


# ------------------------------------------------------------------------------ allocation on models


@pytest.mark.parametrize("target", [4.2, 4.9, 5.5, 5.99])
def test_budget_is_never_exceeded_and_the_prediction_is_the_size_report(make_tiny_llama, tokenizer, target):
    model = make_tiny_llama(layers=2, vocab_size=tokenizer.vocab_size)
    candidates = RTN_2_4 + [lf.Kashin(bits=2), lf.HQQ(bits=3, group_size=16)]
    plan = lf.plan(model, target, calibration=TEXTS, tokenizer=tokenizer, candidates=candidates, progress=False)
    n = sum(row["n_weights"] for row in plan.table.values())
    assert spent_bits(plan) <= target * n
    assert plan.average_bits == pytest.approx(spent_bits(plan) / n) and plan.average_bits <= target
    lf.quantize(model, plan, progress=False)
    report = lf.size_report(model)
    assert report.total["bits_per_weight"] == pytest.approx(plan.average_bits, abs=1e-12)
    assert {r["name"]: r["method"] + str(r["index_bits"]) for r in report.layers} == \
        {name: plan.candidates[label].method + str(plan.candidates[label].bits) for name, label in plan.layers.items()}


def test_a_layer_made_sensitive_gets_more_bits_by_its_own_output_error(make_tiny_llama, tokenizer):
    model = make_tiny_llama(layers=2, vocab_size=tokenizer.vocab_size)
    name = "model.layers.1.mlp.down_proj"  # one the plan leaves at 2 bits in the unchanged model (checked below)
    with torch.no_grad():  # an outlier input feature, the model's function unchanged (LLM.int8's outlier features,
        # Dettmers et al. 2022, §3): feature 5 of the MLP ×50 into down_proj, whose column 5 shrinks ÷50, so
        # rounding that column to its groups' grid (set by the other entries) costs it all its precision
        model.get_submodule("model.layers.1.mlp.up_proj").weight[5] *= 50
        model.get_submodule(name).weight[:, 5] /= 50
    # room to upgrade about one MLP layer in six from 4 to 6 bits
    plan = lf.plan(model, 4.3, calibration=TEXTS, tokenizer=tokenizer, candidates=RTN_2_4, progress=False,
                   use_profile=False, sensitivity="layer")
    assert plan.layers[name] == "rtn4/g16"
    assert sum(label == "rtn4/g16" for label in plan.layers.values()) < len(plan.layers) / 3
    errors = {n: row["candidates"]["rtn2/g16"]["output_error"] for n, row in plan.table.items()}
    assert max(errors, key=errors.get) == name
    unchanged = lf.plan(make_tiny_llama(layers=2, vocab_size=tokenizer.vocab_size), 4.3, calibration=TEXTS,
                        tokenizer=tokenizer, candidates=RTN_2_4, progress=False, use_profile=False,
                        sensitivity="layer")
    assert unchanged.layers[name] == "rtn2/g16"


def test_block_influence_of_the_profile_weighs_the_layers(make_tiny_llama, tokenizer):
    model = make_tiny_llama(layers=2, vocab_size=tokenizer.vocab_size)
    profile = Profile("tiny", 100, 32, layers=[{"index": i} for i in range(3)],
                      transitions=[{"from": 0, "to": 1, "block_influence": 0.9},
                                   {"from": 1, "to": 2, "block_influence": 0.1}])
    plan = lf.plan(model, 4.6, calibration=TEXTS, tokenizer=tokenizer, candidates=RTN_2_4, profile=profile,
                   use_profile=True, progress=False, sensitivity="layer")
    # a tiny random model's layer errors are alike: the weights show
    assert [row["importance"] for n, row in plan.table.items() if ".layers.0." in n] == [pytest.approx(1.8)] * 7
    upgraded = [n for n, label in plan.layers.items() if label == "rtn4/g16"]
    assert upgraded and all(".layers.0." in n for n in upgraded)
    # measured on the calibration tokens instead: the same definition as lf.inspect's block influence
    measured = lf.plan(model, 4.6, calibration=TEXTS, tokenizer=tokenizer, candidates=RTN_2_4, progress=False,
                       use_profile=True)
    inspected = lf.inspect(model, tokenizer, TEXTS, progress=False, tokens=4096, logit_lens=False)
    assert measured.info["block_influence"] == pytest.approx([t["block_influence"] for t in inspected.transitions],
                                                             rel=1e-5)
    flat = lf.plan(model, 4.6, calibration=TEXTS, tokenizer=tokenizer, candidates=RTN_2_4, progress=False)
    assert {row["importance"] for row in flat.table.values()} == {1.0}
    with pytest.raises(lf.LeanformerError, match="pass use_profile=True with it"):  # not silently ignored
        lf.plan(model, 4.6, calibration=TEXTS, tokenizer=tokenizer, candidates=RTN_2_4, profile=profile, progress=False)
    with pytest.raises(lf.LeanformerError, match="profile describes 1 blocks but the model has 2"):
        lf.plan(model, 4.6, calibration=TEXTS, tokenizer=tokenizer, candidates=RTN_2_4, progress=False,
                use_profile=True, profile=Profile("x", 1, 32, [], profile.transitions[:1]))


def test_with_target_reallocates_the_same_measurements(make_tiny_llama, tokenizer):
    model = make_tiny_llama(layers=2, vocab_size=tokenizer.vocab_size)
    kwargs = dict(calibration=TEXTS, tokenizer=tokenizer, candidates=RTN_2_4, progress=False)
    plan = lf.plan(model, 4.3, use_profile=True, **kwargs)
    for target in (4.0, 4.9):
        assert plan.with_target(target).layers == lf.plan(model, target, use_profile=True, **kwargs).layers
    flat = lf.plan(model, 4.9, **kwargs)
    ablated = plan.with_target(4.9, use_profile=False)
    def without_blocks(table):  # use_profile=False does not look up blocks
        return {n: {k: v for k, v in row.items() if k != "block"} for n, row in table.items()}

    assert ablated.layers == flat.layers and without_blocks(ablated.table) == without_blocks(flat.table)
    assert ablated.average_bits == flat.average_bits and not ablated.info["use_profile"]
    with pytest.raises(lf.LeanformerError, match="measured with use_profile=False"):
        flat.with_target(4.9, use_profile=True)
    with pytest.raises(lf.LeanformerError, match="below 4.000"):
        plan.with_target(3.9)


def test_layers_no_candidate_can_store_stay_in_full_precision_and_count(make_tiny_llama, tokenizer):
    model = make_tiny_llama(layers=1, vocab_size=tokenizer.vocab_size)
    # groups of 64 divide only the MLP's 64-wide input (down_proj); the rest cannot take this candidate
    with pytest.warns(UserWarning, match="every layer gets its most accurate candidate"):  # one candidate: min = max
        plan = lf.plan(model, 32.0, calibration=TEXTS, tokenizer=tokenizer,
                       candidates=[lf.RTN(bits=4, group_size=64)], progress=False, use_profile=False)
    assert plan.layers["model.layers.0.mlp.down_proj"] == "rtn4/g64"
    assert [n for n, label in plan.layers.items() if label is None] == [n for n in plan.layers if "down_proj" not in n]
    assert "does not divide" in plan.info["full_precision"]["model.layers.0.self_attn.q_proj"]
    assert any(line.startswith("model.layers.0.self_attn.q_proj") and " full " in line and line.endswith(" -")
               for line in str(plan).splitlines())
    n = plan.info["n_weights"]
    assert plan.average_bits == pytest.approx((32 * (n - 2048) + 2048 * 4.5) / n)


# ------------------------------------------------------------------------------ bad input


def test_too_low_a_target_names_the_minimum_and_too_high_a_target_warns(make_tiny_llama, tokenizer):
    model = make_tiny_llama(layers=1, vocab_size=tokenizer.vocab_size)
    kwargs = dict(calibration=TEXTS, tokenizer=tokenizer, candidates=RTN_2_4, progress=False)
    with pytest.raises(lf.LeanformerError, match=r"target_bits 3.5 is below 4\.000, the fewest honest bits/weight"):
        lf.plan(model, 3.5, **kwargs)
    with pytest.warns(UserWarning, match=r"at or above 6\.000.*every layer gets its most accurate candidate"):
        plan = lf.plan(model, 7.0, **kwargs)
    assert set(plan.layers.values()) == {"rtn4/g16"} and plan.average_bits == 6.0


def test_bad_input_is_named(make_tiny_llama, tokenizer):
    model = make_tiny_llama(layers=1, vocab_size=tokenizer.vocab_size)
    kwargs = dict(tokenizer=tokenizer, candidates=RTN_2_4, progress=False)
    for empty in (None, [], ["", "  "]):
        with pytest.raises(lf.LeanformerError, match="plan needs calibration input.*is empty"):
            lf.plan(model, 5.0, calibration=empty, **kwargs)
    with pytest.raises(lf.LeanformerError, match="match no Linear layer.*Its Linear layers are: self_attn.q_proj"):
        lf.plan(model, 5.0, calibration=TEXTS, targets=["nothing"], **kwargs)
    with pytest.raises(lf.LeanformerError, match="needs the model's tokenizer"):
        lf.plan(model, 5.0, calibration=TEXTS, candidates=RTN_2_4)
    with pytest.raises(lf.LeanformerError, match="target_bits must be a positive number"):
        lf.plan(model, 0, calibration=TEXTS, **kwargs)
    with pytest.raises(lf.LeanformerError, match="rtn2/g16 is listed twice"):
        lf.plan(model, 5.0, calibration=TEXTS, tokenizer=tokenizer, candidates=RTN_2_4 + RTN_2_4[:1])
    with pytest.raises(lf.LeanformerError, match="candidate rtn2 sets targets"):
        lf.plan(model, 5.0, calibration=TEXTS, tokenizer=tokenizer, candidates=[lf.RTN(bits=2, targets=["q_proj"])])
    with pytest.raises(lf.LeanformerError, match="unknown PlanConfig field.*did you mean tokens"):
        lf.plan(model, 5.0, calibration=TEXTS, token=5, **kwargs)
    lf.quantize(model, lf.RTN(bits=4, group_size=16, targets=["q_proj"]), progress=False)
    with pytest.raises(lf.LeanformerError, match="already quantized"):
        lf.plan(model, 5.0, calibration=TEXTS, **kwargs)


# ------------------------------------------------------------------------------ round trips


def test_plan_quantize_save_load_round_trip(make_tiny_llama, tokenizer, tmp_path):
    model = make_tiny_llama(layers=2, vocab_size=tokenizer.vocab_size)
    plan = lf.plan(model, 4.6, calibration=TEXTS, tokenizer=tokenizer, candidates=RTN_2_4 + [lf.Kashin(bits=2)],
                   progress=False, targets=["q_proj", "v_proj", "down_proj"])
    assert len(plan.layers) == 6 and len(plan.groups()) >= 2
    again = QuantPlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again.to_dict() == plan.to_dict() and again.candidates == plan.candidates
    quantized = copy.deepcopy(model)
    reports = lf.quantize(quantized, again, progress=False)
    assert sorted(n for r in reports for n in r.quantized) == sorted(plan.layers)
    ids = torch.randint(0, tokenizer.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    expected = quantized(ids).logits
    assert not torch.allclose(expected, model(ids).logits)
    lf.save(quantized, tokenizer, tmp_path / "planned")
    loaded, _ = lf.load(tmp_path / "planned")
    assert torch.equal(loaded(ids).logits, expected)
    layers = {n: m for n, m in loaded.named_modules() if isinstance(m, QuantizedLinear)}
    assert {n: (m.method, m.header["bits"]) for n, m in layers.items()} == \
        {n: (plan.config_of(n).method, plan.config_of(n).bits) for n in plan.layers}


def test_candidate_labels_name_what_differs_from_the_defaults():
    assert candidate_label(lf.Kashin(bits=3)) == "kashin3"
    assert candidate_label(lf.HQQ(bits=2, group_size=64)) == "hqq2"
    assert candidate_label(lf.RTN(bits=4, group_size=16)) == "rtn4/g16"
    assert candidate_label(lf.Kashin(bits=3, step_sizes="shared")) == "kashin3 step_sizes=shared"
    assert not PlanConfig().use_profile  # the default end-to-end error already holds what block influence estimates


# ------------------------------------------------------------------------------ command line


def test_cli_target_bits_prints_and_saves_the_plan(tiny_llama_dir, tmp_path, capsys):
    text = tmp_path / "calib.txt"
    text.write_text("\n\n".join(TEXTS))
    out = tmp_path / "planned"
    assert main(["compress", str(tiny_llama_dir), "--target-bits", "4.6", "--text", str(text),
                 "--method", "rtn", "--group-size", "16", "--tokens", "512", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "quantization plan: target 4.6 bits/weight" in printed and "rtn3/g16" in printed
    saved = load_json(out / "plan.json")
    assert list(saved["candidates"]) == ["rtn2/g16", "rtn3/g16", "rtn4/g16"]
    assert saved["average_bits"] <= 4.6 and saved["info"]["calibration_tokens"] == 512
    model, _ = lf.load(out)
    assert lf.size_report(model).total["bits_per_weight"] == pytest.approx(saved["average_bits"])
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    assert {n: f"rtn{m.header['bits']}/g16" for n, m in layers.items()} == saved["layers"]


def test_cli_plan_flag_errors(tiny_llama_dir, tmp_path, capsys):
    def err(*argv):
        assert main(["compress", str(tiny_llama_dir), *argv, "--out", str(tmp_path / "x")]) == 2
        return capsys.readouterr().err

    assert "give --method (one of kashin, rtn, hqq, gptq, kashin-gptq)" in err()
    assert "--tokens only apply with --target-bits" in err("--method", "rtn", "--tokens", "64")
    assert "--bits fixes one width" in err("--target-bits", "3", "--method", "rtn", "--bits", "3")
    assert "--group-size shape one method's candidates" in err("--target-bits", "3", "--group-size", "16")
    assert "--step-sizes applies to kashin, not to --method rtn" in err("--target-bits", "3", "--method", "rtn",
                                                                        "--step-sizes", "shared")
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------ end-to-end sensitivity


@torch.no_grad()
def final_states(model, tokenizer) -> torch.Tensor:
    """The base model's last hidden state on the plan's calibration tokens, padding removed."""
    out = []
    for batch in batches(tokenizer, token_chunks(tokenizer, TEXTS, 128, 4096), 16):
        h = model.base_model(**batch).last_hidden_state
        out.append(h[batch["attention_mask"].bool()])
    return torch.cat(out).double()


def test_output_sensitivity_is_the_relative_change_of_the_final_hidden_states(make_tiny_llama, tokenizer):
    model = make_tiny_llama(layers=2, vocab_size=tokenizer.vocab_size)
    exact = "model.layers.0.self_attn.q_proj"
    with torch.no_grad():  # every group of 16 holds 0 and 0.75 and steps of 0.25: 2-bit RTN stores it exactly
        w = model.get_submodule(exact).weight
        codes = torch.randint(0, 4, w.shape, generator=torch.Generator().manual_seed(1))
        codes.view(-1, 16)[:, 0], codes.view(-1, 16)[:, 1] = 0, 3
        w.copy_(codes * 0.25)
    plan = lf.plan(model, 5.0, calibration=TEXTS, tokenizer=tokenizer, candidates=RTN_2_4, progress=False,
                   use_profile=False)
    assert plan.info["sensitivity"] == "output" and PlanConfig().sensitivity == "output"
    stored_exactly = plan.table[exact]["candidates"]["rtn2/g16"]
    assert stored_exactly["final_error"] == stored_exactly["output_error"] == 0.0
    assert plan.table[exact]["candidates"]["rtn4/g16"]["final_error"] > 0  # its 4-bit grid does not hold 0.25
    name = "model.layers.1.mlp.down_proj"
    reference = final_states(model, tokenizer)
    changed = copy.deepcopy(model)
    lf.quantize(changed, lf.RTN(bits=2, group_size=16, targets=[name]), progress=False)
    expected = float((final_states(changed, tokenizer) - reference).pow(2).sum() / reference.pow(2).sum())
    row = plan.table[name]["candidates"]["rtn2/g16"]
    assert row["final_error"] == pytest.approx(expected, rel=1e-5) and row["final_error"] > 0
    assert row["sensitivity"] == row["final_error"] != row["output_error"]
    assert model.training is False  # tiny models are built in eval mode; plan restores the mode it found
    model.train()
    lf.plan(model, 5.0, calibration=TEXTS, tokenizer=tokenizer, candidates=RTN_2_4, progress=False)
    assert model.training


def test_layers_whose_output_the_final_state_ignores_get_the_fewest_bits(make_tiny_llama, tokenizer):
    model = make_tiny_llama(layers=2, vocab_size=tokenizer.vocab_size)
    with torch.no_grad():  # block 1's attention output is multiplied by 0: q, k, v there change nothing downstream
        model.get_submodule("model.layers.1.self_attn.o_proj").weight.zero_()
    ignored = [f"model.layers.1.self_attn.{p}_proj" for p in "qkv"]
    kwargs = dict(calibration=TEXTS, tokenizer=tokenizer, candidates=RTN_2_4, progress=False, use_profile=False)
    plan = lf.plan(model, 4.6, **kwargs)
    for name in ignored:
        assert {m["final_error"] for m in plan.table[name]["candidates"].values()} == {0.0}
        assert plan.table[name]["candidates"]["rtn2/g16"]["output_error"] > 0  # the layer's own output does change
        assert plan.layers[name] == "rtn2/g16"
    assert any(label == "rtn4/g16" for label in plan.layers.values())
    # the same measurements by the layers' own errors upgrade some of them; planning again agrees
    by_layer = plan.with_target(4.6, sensitivity="layer")
    assert any(by_layer.layers[name] == "rtn4/g16" for name in ignored)
    again = lf.plan(model, 4.6, sensitivity="layer", **kwargs)
    assert again.layers == by_layer.layers and again.info["sensitivity"] == "layer"
    assert all("final_error" not in m for row in again.table.values() for m in row["candidates"].values())
    assert by_layer.with_target(4.6, sensitivity="output").layers == plan.layers  # the table keeps both
    with pytest.raises(lf.LeanformerError, match="measured with sensitivity='layer'"):
        again.with_target(4.6, sensitivity="output")
    with pytest.raises(lf.LeanformerError, match="sensitivity must be one of output, layer, got 'model'"):
        plan.with_target(4.6, sensitivity="model")
    with pytest.raises(lf.LeanformerError, match="sensitivity must be one of output, layer, got 'final'"):
        lf.plan(model, 4.6, sensitivity="final", **kwargs)
    assert "relative change of the final hidden states" in str(plan)
    assert "relative output error" in str(again)

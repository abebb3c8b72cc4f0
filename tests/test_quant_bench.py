"""benchmarks/quant_bench.py: its Pareto front, intervals, group fallback, finished-row reuse and the
latency child, on tiny random models (the full benchmark is run by hand: make quant-bench)."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import quant_bench  # noqa: E402


def test_pareto_front_keeps_only_undominated_points_sorted_by_bits():
    # (bits, quality): the third is dominated by the second (fewer bits, better); the fourth ties the
    # first on bits with worse quality
    points = [(2.0, 0.5), (3.0, 0.9), (3.5, 0.8), (2.0, 0.4), (4.0, 0.95)]
    assert quant_bench.pareto_front(points, higher_is_better=True) == [0, 1, 4]
    # lower is better (perplexity): now the low values win
    assert quant_bench.pareto_front([(2.0, 9.0), (3.0, 5.0), (3.0, 6.0), (4.0, 5.0)], higher_is_better=False) == [0, 1]


def test_bootstrap_interval_is_deterministic_and_brackets_the_mean():
    x = np.random.default_rng(1).random(200)
    a = quant_bench.bootstrap(lambda i: x[i].mean(), len(x), seed=0)
    assert a == quant_bench.bootstrap(lambda i: x[i].mean(), len(x), seed=0)
    assert a[0] < x.mean() < a[1] and a[1] - a[0] < 0.2


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=96, num_attention_heads=4,
                                        num_key_value_heads=2, num_hidden_layers=1, vocab_size=128)).eval()


def test_group_that_misses_some_layers_falls_back_per_row_and_one_that_fits_none_is_skipped():
    specs = {s.label: s for s in quant_bench.specs()}
    model = _tiny_llama()
    info = quant_bench.apply_config(model, specs["rtn-3-g64"], {})
    assert info["fallback_per_row"] == ["model.layers.0.mlp.down_proj"]  # 96 wide: 64 does not divide it
    headers = {n: m.header for n, m in model.named_modules() if hasattr(m, "header")}
    assert headers["model.layers.0.mlp.down_proj"]["group_size"] == 96
    assert headers["model.layers.0.mlp.up_proj"]["group_size"] == 64
    with pytest.raises(quant_bench.Unavailable, match="group 192 divides no layer"):
        quant_bench.apply_config(_tiny_llama(), specs["rtn-3-g192"], {})


def test_window_perplexity_of_uniform_logits_is_the_vocabulary_size():
    class Uniform(torch.nn.Module):
        def forward(self, input_ids):
            return type("Out", (), {"logits": torch.zeros(*input_ids.shape, 50)})()

    data = {"windows": torch.randint(0, 50, (8, 16), generator=torch.Generator().manual_seed(0))}
    q = quant_bench.stories_quality(Uniform(), data, None, seed=0)
    assert q["perplexity"] == pytest.approx(50.0) and q["ci"] == pytest.approx([50.0, 50.0])
    d = quant_bench.stories_quality(Uniform(), data, q, seed=0)
    assert d["delta_vs_fp32"] == pytest.approx(0.0)


def test_smoke_run_writes_results_and_a_rerun_reuses_finished_rows(tmp_path, capsys):
    args = ["--smoke", "--only", "rtn-3-g64$|hqq-3-g192", "--no-latency", "--out", str(tmp_path / "out"),
            "--cache", str(tmp_path / "cache")]
    quant_bench.main(args)
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r["config"] for r in res["rows"]["minilm"]] == ["rtn-3-g64"]
    row = res["rows"]["stories260k"][0]
    assert 3.0 < row["bits_per_weight"] < 4.0 and row["fallback_per_row"]  # the 96-wide down_proj
    assert len(res["rows"]["minilm"][0]["sst2"]["predictions"]) == 48
    assert "group 192 divides no layer" in res["skipped"]["minilm/hqq-3-g192"]
    assert (tmp_path / "out" / "minilm_pareto.png").is_file()
    md = (tmp_path / "out" / "results.md").read_text()
    assert "## Targets" in md and "rtn-3-g64" in md
    lines = (tmp_path / "cache" / "rows.jsonl").read_text().splitlines()
    capsys.readouterr()
    quant_bench.main(args)
    assert " b/w " not in capsys.readouterr().out  # no row measured again (the skipped ones are re-checked: cheap)
    assert (tmp_path / "cache" / "rows.jsonl").read_text().splitlines() == lines
    assert json.loads((tmp_path / "out" / "results.json").read_text())["rows"] == res["rows"]


def test_latency_child_times_a_saved_quantized_model_in_a_fresh_process(tmp_path):
    import leanformer as lf
    from leanformer.models import alias_path
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(alias_path("minilm")))
    model = _tiny_llama()
    model.resize_token_embeddings(tok.vocab_size)
    lf.quantize(model, lf.RTN(bits=4, group_size=32), progress=False)
    lf.save(model, tok, tmp_path / "q", base_weights="stored")
    out = quant_bench.run_latency_child({"dir": str(tmp_path / "q"), "repeats": 2, "kind": "decoder",
                                         "prompt_ids": tok("once upon")["input_ids"], "new_tokens": 4,
                                         "pad_id": tok.pad_token_id, "reference": str(tmp_path / "q"), "pairs": 3})
    for mode in ("default", "cache"):
        assert out[mode]["new_tokens"] == 4 and out[mode]["tokens_per_s"] > 0 and len(out[mode]["runs_s"]) == 2
    assert out["default"]["generated_ids"] == out["cache"]["generated_ids"]  # the cache changes speed, not output
    assert out["rss_load_mib"] >= 0
    paired = out["paired"]  # the model against its reference (here a second copy: an A/A control), 3 rounds
    assert len(paired["pairs"]) == 3 and paired["unit"] == "tokens_per_s"
    q1, q3 = paired["ratio_quartiles"]
    assert 0 < q1 <= paired["ratio"] <= q3


def test_every_target_line_carries_its_numbers():
    latency = {"target": "≤3-bit models at batch 1 …", "status": "missed", "missing": [],
               "detail": {"kashin-3": {"ratio": 0.97, "quartiles": [0.92, 1.02]}},
               "control": {"ratio": 1.0, "quartiles": [0.94, 1.05]}}
    front = {"target": "Kashin (any variant) on the Pareto front …", "status": "met",
             "detail": {"minilm": {"front": ["hqq-2-row", "kashin-2"], "kashin_on_front": ["kashin-2"]}}}
    plan = {"target": "plan-3.0 beats uniform Kashin-3 …", "status": "missed", "plan": "plan-3.0",
            "detail": {"minilm: cosine": {"plan-3.0": 0.91, "kashin-3": 0.9059, "plan_bits": 2.997,
                                          "kashin_bits": 3.131}}}
    assert quant_bench._target_numbers(latency) == ("kashin-3 0.97× fp32 [0.92, 1.02]; A/A control (fp32 against a "
                                                    "second fp32 copy, same procedure) 1.00 [0.94, 1.05]")
    assert quant_bench._target_numbers(front) == "minilm: kashin-2 of front hqq-2-row, kashin-2"
    assert quant_bench._target_numbers(plan) == "minilm: cosine: 0.9100 vs 0.9059 (2.997 vs 3.131 bits/w)"

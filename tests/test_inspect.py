"""inspect(): padding-invariance, decoders and encoders, the report page, the CLI's outputs and its errors."""
import json
import re

import pytest
import torch

import leanformer as lf
from leanformer.cli import main
from leanformer.metrics.schema import LAYER_METRICS, TRANSITION_METRICS
from leanformer.report import plot_profile, write_report
from leanformer.text import default_corpus, token_chunks

TEXTS = default_corpus()[:60]


def _values(profile):
    return [v for row in profile.layers + profile.transitions for k, v in row.items()
            if k not in ("index", "from", "to") and v is not None]


@pytest.mark.parametrize("model_name", ["tiny_bert", "tiny_llama"])
def test_padding_does_not_change_any_metric(model_name, tokenizer, request):
    model = request.getfixturevalue(model_name)
    kwargs = dict(tokens=1500, max_length=48, sample_size=400, progress=False)
    one = lf.inspect(model, tokenizer, TEXTS, batch_size=1, **kwargs)   # no padding at all
    mixed = lf.inspect(model, tokenizer, TEXTS, batch_size=7, **kwargs)  # heavy padding
    assert one.n_tokens == mixed.n_tokens == 1500
    assert len(_values(one)) >= 4 * len(one.transitions)  # every block metric is defined
    assert _values(one) == pytest.approx(_values(mixed), abs=1e-4)


def test_profile_shape_and_ranges(tiny_llama, tokenizer):
    p = lf.inspect(tiny_llama, tokenizer, TEXTS, tokens=1000, max_length=64, sample_size=300, progress=False)
    assert len(p.layers) == 4 and len(p.transitions) == 3
    for t in p.transitions:
        assert 0 <= t["linearity"] <= 1 + 1e-9 and 0 <= t["angular_distance"] <= 1
    assert all(0 < layer["anisotropy"] <= 1 for layer in p.layers)
    assert p.layers[0]["mlp_sparsity"] is None and all(0 <= l["mlp_sparsity"] <= 1 for l in p.layers[1:])
    assert "before the final norm" in p.info["hidden_states"]
    assert lf.Profile.from_json(json.loads(json.dumps(p.to_json()))) == p


def test_too_little_text_says_how_many_tokens_are_needed(tiny_bert, tokenizer):
    with pytest.raises(lf.LeanformerError, match=r"more tokens than the hidden size \(32\).*at least 33"):
        lf.inspect(tiny_bert, tokenizer, ["a short sentence."], progress=False)
    with pytest.raises(lf.LeanformerError, match="empty"):
        lf.inspect(tiny_bert, tokenizer, ["", "  "], progress=False)
    with pytest.raises(lf.LeanformerError, match="--tokens must be positive"):
        token_chunks(tokenizer, TEXTS, 64, tokens=0)


def without_embedded_images(page: str) -> str:
    """The page less its base64 payloads (which may spell anything, "http" included)."""
    return re.sub(r"base64,[A-Za-z0-9+/=]+", "base64,", page)


def synthetic_profile(model: str = "tiny", info: dict | None = None) -> lf.Profile:
    """Three hidden states, two blocks; h_0 has no MLP and an undefined intrinsic dimension, as a decoder's may."""
    layers = [{"index": i, "anisotropy": 0.1 * (i + 1), "intrinsic_dim": None if i == 0 else 2.0 + i,
               "mlp_sparsity": None if i == 0 else 0.25 * i} for i in range(3)]
    transitions = [{"from": i, "to": i + 1, "linearity": 0.9 - 0.1 * i, "linearity_wo_residual": 0.5,
                    "block_influence": 0.125, "angular_distance": 0.0625} for i in range(2)]
    return lf.Profile(model, 1000, 32, layers, transitions, info or {})


def test_metric_schema_covers_the_metrics_json_rows():
    assert [m.name for m in LAYER_METRICS] == ["anisotropy", "intrinsic_dim", "mlp_sparsity", "logit_lens_loss",
                                               "logit_lens_agreement"]
    assert [m.name for m in TRANSITION_METRICS] == ["linearity", "linearity_wo_residual", "block_influence",
                                                    "angular_distance"]
    assert {m.axis for m in LAYER_METRICS} == {"layer"} and {m.axis for m in TRANSITION_METRICS} == {"transition"}


def test_table_columns_follow_the_schema():
    table = synthetic_profile().table().splitlines()
    # the logit-lens columns have no value in this (encoder-like) profile, so the table leaves them out
    assert table[0].split() == ["layer", *(m.short for m in LAYER_METRICS[:3]), "│", "block",
                                *(m.short for m in TRANSITION_METRICS)]
    assert len(table) == 2 + 3 and len({len(line) for line in table[:4]}) == 1  # aligned columns
    assert table[2].split() == ["0", "0.1000", "—", "—", "│", "0→1", "0.9000", "0.5000", "0.1250", "0.0625"]
    assert table[4].split() == ["2", "0.3000", "4.00", "0.500"]  # h_L: no block after it


def test_report_page_follows_the_schema_and_escapes_text(tmp_path):
    profile = synthetic_profile("<script>alert(1)</script>", info={"note": "a < b & c", "seconds": 1.23456})
    plots = plot_profile(profile, tmp_path)
    layer_metrics = LAYER_METRICS[:3]  # no logit lens in this profile: no column, no plot
    assert [p.name for p in plots] == [f"{m.name}.png" for m in TRANSITION_METRICS + layer_metrics]
    page = write_report(profile, plots, tmp_path / "report.html").read_text()
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<b>note</b>: a &lt; b &amp; c" in page and "<b>seconds</b>: 1.2346" in page
    headers = ["layer", *(m.label for m in layer_metrics), "block", *(m.label for m in TRANSITION_METRICS)]
    first_table = page.split("</table>")[0]
    assert re.findall(r"<th(?: [^>]*)?>(.*?)</th>", first_table) == headers
    rows = [re.findall(r"<td>(.*?)</td>", row) for row in re.findall(r"<tr><td>.*?</tr>", page, re.S)]
    assert rows[0] == ["0", "0.1000", "—", "—", "0→1", "0.9000", "0.5000", "0.1250", "0.0625"]
    assert rows[2] == ["2", "0.3000", "4.00", "0.500", "", "—", "—", "—", "—"]
    titles = [m.title for m in TRANSITION_METRICS + layer_metrics]
    assert re.findall(r'<img alt="([^"]*)" src="data:image/png;base64,', page) == titles
    assert re.findall(r"<figcaption>(.*?)</figcaption>", page) == titles
    assert "http" not in without_embedded_images(page)  # self-contained


def test_model_without_blocks_is_named(tokenizer):
    class NoBlocks(torch.nn.Module):
        config = type("C", (), {"hidden_size": 8, "num_hidden_layers": 2})()

        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(8, 8)

    with pytest.raises(lf.LeanformerError, match="cannot find the transformer block list of NoBlocks"):
        lf.inspect(NoBlocks(), tokenizer, TEXTS, progress=False)


def test_cli_writes_metrics_plots_and_report(tiny_bert_dir, tmp_path, capsys):
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(TEXTS))
    out = tmp_path / "run"
    assert main(["inspect", str(tiny_bert_dir), "--text", str(text), "--tokens", "800", "--max-seq-length", "64",
                 "--sample-size", "300", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    # the metrics.json contract: exactly these keys
    assert set(metrics) == {"model", "n_tokens", "hidden_size", "layers", "transitions", "info"}
    assert metrics["n_tokens"] == 800 and metrics["hidden_size"] == 32
    assert all(set(layer) == {"index", "anisotropy", "intrinsic_dim", "mlp_sparsity", "logit_lens_loss",
                              "logit_lens_agreement"} for layer in metrics["layers"])
    assert all(layer["logit_lens_loss"] is None for layer in metrics["layers"])  # an encoder: no lens
    assert metrics["info"]["logit_lens"].startswith("skipped: not a causal LM")
    assert metrics["info"]["id_estimator"] == "twonn-skdim"
    assert all(set(t) == {"from", "to", "linearity", "linearity_wo_residual", "block_influence", "angular_distance"}
               for t in metrics["transitions"])
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert "linearity.png" in pngs and "intrinsic_dim.png" in pngs and len(pngs) == 7
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 7 and "http" not in without_embedded_images(html)
    assert "linearity" in capsys.readouterr().out
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run")]  # no staging left behind


def test_cli_errors_are_clear_and_leave_nothing_behind(tiny_bert_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["inspect", str(tmp_path / "missing-model"), "--out", str(out)]) == 2
    assert "model path not found" in capsys.readouterr().err
    assert main(["inspect", str(tiny_bert_dir), "--tokens", "0", "--out", str(out)]) == 2
    assert "--tokens must be positive" in capsys.readouterr().err
    short = tmp_path / "short.txt"
    short.write_text("Too short.")
    assert main(["inspect", str(tiny_bert_dir), "--text", str(short), "--out", str(out)]) == 2
    assert "at least 33" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(["inspect", str(tiny_bert_dir), "--text", str(empty), "--out", str(out)]) == 2
    assert "empty" in capsys.readouterr().err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]

    out.mkdir()
    (out / "old.txt").write_text("from an earlier run")
    assert main(["inspect", str(tiny_bert_dir), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err and (out / "old.txt").exists()


def test_unwritable_out_fails_before_work(tiny_bert_dir, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["inspect", str(tiny_bert_dir), "--out", str(blocker / "run")]) == 2
    assert "cannot write" in capsys.readouterr().err


def test_hub_id_fails_fast_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(lf.LeanformerError, match="Hub is unavailable"):
        lf.load("some-org/some-model-that-is-not-cached")


def test_hf_datasets_name_and_offline_error(tmp_path, monkeypatch):
    from leanformer.text import get_texts

    local = tmp_path / "my_corpus"  # a local datasets directory: the "text" builder, split train
    local.mkdir()
    (local / "train.txt").write_text("first line of text\nsecond line of text\n")
    assert get_texts(dataset=str(local)) == ["first line of text", "second line of text"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(lf.LeanformerError, match="could not load Hugging Face dataset 'no-such/dataset'.*--text"):
        get_texts(dataset="no-such/dataset")


def test_minilm_profile_end_to_end():
    model, tok = lf.load("minilm")
    p = lf.inspect(model, tok, default_corpus(), tokens=4096, sample_size=1024, progress=False)
    assert p.hidden_size == 384 and len(p.transitions) == 6 and p.n_tokens == 4096
    lin = [t["linearity"] for t in p.transitions]
    assert all(0.5 < v < 1 for v in lin)  # residual stream: strongly but not exactly linear
    assert all(t["linearity_wo_residual"] < t["linearity"] + 0.3 for t in p.transitions)
    assert all(1 < layer["intrinsic_dim"] < 60 for layer in p.layers)


def test_id_estimator_is_a_choice_recorded_with_the_profile(tiny_bert, tokenizer):
    kwargs = dict(tokens=1200, max_length=48, sample_size=500, progress=False)
    skdim = lf.inspect(tiny_bert, tokenizer, TEXTS, **kwargs)
    paper = lf.inspect(tiny_bert, tokenizer, TEXTS, id_estimator="twonn-paper", **kwargs)
    assert skdim.info["id_estimator"] == "twonn-skdim" and paper.info["id_estimator"] == "twonn-paper"
    assert "Facco" in skdim.info["intrinsic_dim_estimator"] and "N//5" in paper.info["intrinsic_dim_estimator"]
    # same points, another fit: the paper's estimate is the smallest-fifth fit of the same sample
    assert [l["anisotropy"] for l in skdim.layers] == [l["anisotropy"] for l in paper.layers]
    assert any(abs(a["intrinsic_dim"] - b["intrinsic_dim"]) > 1e-3 for a, b in zip(skdim.layers[1:], paper.layers[1:]))
    with pytest.raises(lf.LeanformerError, match="unknown id_estimator 'twonn'; choose from twonn-skdim, twonn-paper"):
        lf.inspect(tiny_bert, tokenizer, TEXTS, id_estimator="twonn", **kwargs)


def test_logit_lens_of_a_causal_lm_ends_at_the_models_own_loss(tiny_llama, tokenizer):
    p = lf.inspect(tiny_llama, tokenizer, TEXTS, tokens=900, max_length=64, batch_size=5, sample_size=300,
                   progress=False)
    chunks = token_chunks(tokenizer, TEXTS, 64, tokens=900)
    total, targets = 0.0, 0
    with torch.no_grad():
        for c in chunks:  # the model's own next-token loss, window by window, no padding
            ids = torch.tensor([c])
            total += float(tiny_llama(input_ids=ids, labels=ids).loss) * (len(c) - 1)
            targets += len(c) - 1
    last = p.layers[-1]
    assert last["logit_lens_loss"] == pytest.approx(total / targets, rel=1e-5)
    assert last["logit_lens_agreement"] == 1.0
    assert all(0 <= l["logit_lens_agreement"] <= 1 and l["logit_lens_loss"] > 0 for l in p.layers)
    assert {"lens_loss", "lens_top1"} <= set(p.table().splitlines()[0].split())


def test_logit_lens_is_skipped_with_a_reason_when_it_cannot_reproduce_the_logits(tiny_llama, tokenizer):
    def soft_cap(_module, _args, out):  # the model post-processes its logits (as Gemma-2 soft-caps them)
        out.logits = 30 * torch.tanh(out.logits / 30) + 1
        return out

    tiny_llama.register_forward_hook(soft_cap)
    p = lf.inspect(tiny_llama, tokenizer, TEXTS, tokens=600, max_length=64, sample_size=200, progress=False)
    assert all(l["logit_lens_loss"] is None for l in p.layers)
    assert p.info["logit_lens"].startswith("skipped: decoding h_L with the final norm and LM head differs")
    p = lf.inspect(tiny_llama, tokenizer, TEXTS, tokens=600, max_length=64, sample_size=200, logit_lens=False,
                   progress=False)
    assert p.info["logit_lens"] == "skipped: turned off (logit_lens=False)"


@pytest.mark.parametrize("by", ["linearity", "block_influence", "angular"])
def test_pruning_candidates_are_the_blocks_prune_removes(by, make_tiny_llama, tokenizer):
    model = make_tiny_llama(layers=4, vocab_size=tokenizer.vocab_size, seed=1)
    p = lf.inspect(model, tokenizer, TEXTS, tokens=1500, max_length=64, batch_size=8, sample_size=200,
                   logit_lens=False, progress=False)
    result = lf.prune_layers(model, 1, by=by, tokenizer=tokenizer, texts=TEXTS, tokens=1500, max_length=64)
    candidates = p.pruning_candidates()[by]
    assert candidates[0]["block"] == result.start
    assert candidates[0]["value"] == pytest.approx(result.scores[by][result.start], abs=1e-6)
    assert len(candidates) == 3 and len({c["block"] for c in candidates}) == 3

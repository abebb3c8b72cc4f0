"""inspect(): padding-invariance, decoders and encoders, the CLI's outputs and its errors."""
import json

import pytest
import torch

import leanformer as lf
from leanformer.cli import main
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


def test_model_without_blocks_is_named(tokenizer):
    class NoBlocks(torch.nn.Module):
        config = type("C", (), {"hidden_size": 8, "num_hidden_layers": 2})()

        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(8, 8)

    with pytest.raises(lf.LeanformerError, match="cannot find the transformer block list of NoBlocks.*model.layers"):
        lf.inspect(NoBlocks(), tokenizer, TEXTS, progress=False)


@pytest.fixture
def tiny_dir(tmp_path, tiny_bert, tokenizer):
    path = tmp_path / "tiny-bert"
    tiny_bert.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_cli_writes_metrics_plots_and_report(tiny_dir, tmp_path, capsys):
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(TEXTS))
    out = tmp_path / "run"
    assert main(["inspect", str(tiny_dir), "--text", str(text), "--tokens", "800", "--max-length", "64",
                 "--sample-size", "300", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) >= {"model", "n_tokens", "hidden_size", "layers", "transitions"}
    assert metrics["n_tokens"] == 800 and metrics["hidden_size"] == 32
    assert set(metrics["layers"][0]) >= {"index", "anisotropy", "intrinsic_dim", "mlp_sparsity"}
    assert set(metrics["transitions"][0]) >= {"from", "to", "linearity", "linearity_wo_residual",
                                              "block_influence", "angular_distance"}
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert "linearity.png" in pngs and "intrinsic_dim.png" in pngs and len(pngs) == 7
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 7 and "http" not in html.replace("http-equiv", "")
    assert "linearity" in capsys.readouterr().out
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run")]  # no staging left behind


def test_cli_errors_are_clear_and_leave_nothing_behind(tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["inspect", str(tmp_path / "missing-model"), "--out", str(out)]) == 2
    assert "model path not found" in capsys.readouterr().err
    assert main(["inspect", str(tiny_dir), "--tokens", "0", "--out", str(out)]) == 2
    assert "--tokens must be positive" in capsys.readouterr().err
    short = tmp_path / "short.txt"
    short.write_text("Too short.")
    assert main(["inspect", str(tiny_dir), "--text", str(short), "--out", str(out)]) == 2
    assert "at least 33" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(["inspect", str(tiny_dir), "--text", str(empty), "--out", str(out)]) == 2
    assert "empty" in capsys.readouterr().err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]

    out.mkdir()
    (out / "old.txt").write_text("from an earlier run")
    assert main(["inspect", str(tiny_dir), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err and (out / "old.txt").exists()


def test_unwritable_out_fails_before_work(tiny_dir, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["inspect", str(tiny_dir), "--out", str(blocker / "run")]) == 2
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

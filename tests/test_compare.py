"""compare(): profiles side by side, a pruned model's layers on its base's axis, and clear errors."""
import json

import pytest

import leanformer as lf
from leanformer.cli import main
from leanformer.text import default_corpus

TEXTS = default_corpus()[:60]
SMALL = ["--tokens", "700", "--max-seq-length", "64", "--sample-size", "200"]


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(TEXTS))
    return path


@pytest.fixture
def pruned_dir(tmp_path, make_tiny_bert, tokenizer):
    """tiny BERT (4 blocks) with block 1 removed, saved by lf.save, and its unpruned base."""
    base = make_tiny_bert(layers=4, vocab_size=tokenizer.vocab_size)
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    model, tok = lf.load(tmp_path / "base")
    lf.prune_layers(model, 1, by="index", start=1)
    lf.save(model, tok, tmp_path / "pruned")
    return tmp_path / "base", tmp_path / "pruned"


def test_base_vs_pruned_models_line_up_on_the_base_axis(pruned_dir, text_file, tmp_path, capsys):
    base, pruned = pruned_dir
    out = tmp_path / "cmp"
    assert main(["compare", str(base), str(pruned), "--text", str(text_file), *SMALL, "--out", str(out)]) == 0
    data = json.loads((out / "compare.json").read_text())
    runs = {r["label"]: r for r in data["runs"]}
    assert runs["pruned"]["block_x"] == [0, 2, 3]  # block 1 was removed: the others keep their base numbers
    assert runs["pruned"]["layer_x"] == [0, 1, 3, 4]
    assert runs["pruned"]["profile"]["info"]["transforms"] == ["prune: blocks [1] removed (by index), 4 → 3 blocks"]
    # the blocks before the cut see the same inputs as in the base: identical metrics there
    diff = data["differences"]["pruned"]
    assert diff["linearity"]["0"] == pytest.approx(0, abs=1e-9) and "1" not in diff["linearity"]
    assert diff["anisotropy"]["1"] == pytest.approx(0, abs=1e-9) and "2" not in diff["anisotropy"]
    what = {row["what"]: row["cells"] for row in data["what_changed"]}
    assert what["blocks"] == ["4 → 3"] and what["transforms"][0].startswith("prune: blocks [1]")
    assert (out / "profiles" / "pruned" / "metrics.json").is_file()  # reusable as an inspect output
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 7 and "What changed" in page
    assert "prune --by linearity would remove" in capsys.readouterr().out

    # the saved profiles are inspect outputs: comparing them gives the same differences, without models
    again = lf.compare([out / "profiles" / "base", out / "profiles" / "pruned"])
    assert [r.kind for r in again.runs] == ["inspect output"] * 2
    assert again.to_json()["differences"] == data["differences"]


def test_runs_that_measured_different_tokens_are_refused_unless_forced(tiny_bert_dir, text_file, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["inspect", str(tiny_bert_dir), "--text", str(text_file), *SMALL, "--out", str(a)]) == 0
    assert main(["inspect", str(tiny_bert_dir), "--text", str(text_file), *SMALL[2:], "--tokens", "600",
                 "--seed", "1", "--id-estimator", "twonn-paper", "--out", str(b)]) == 0
    assert json.loads((b / "metrics.json").read_text())["info"]["id_estimator"] == "twonn-paper"
    capsys.readouterr()
    out = tmp_path / "cmp"
    assert main(["compare", str(a), str(b), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "token count: a 700 ≠ b 600" in err and "sample seed (--seed): a 0 ≠ b 1" in err and "--force" in err
    assert "intrinsic-dimension estimator (--id-estimator): a twonn-skdim ≠ b twonn-paper" in err
    assert not out.exists()
    assert main(["compare", str(a), str(b), "--force", "--out", str(out)]) == 0
    warnings = json.loads((out / "compare.json").read_text())["warnings"]
    assert any("token count" in w for w in warnings) and "token count" in (out / "report.html").read_text()


def test_bad_runs_are_named(tiny_bert_dir, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", str(tiny_bert_dir), "--out", str(out)]) == 2
    assert "compare needs at least two runs, got 1" in capsys.readouterr().err
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "notes.txt").write_text("x")
    assert main(["compare", str(tiny_bert_dir), str(stray), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "stray is neither an inspect output directory (no metrics.json) nor a model directory" in err
    assert "notes.txt" in err
    finetuned = tmp_path / "finetune-run"
    finetuned.mkdir()
    (finetuned / "metrics.json").write_text(json.dumps({"accuracy": 0.9, "trainable_params": 10}))
    assert main(["compare", str(tiny_bert_dir), str(finetuned), "--out", str(out)]) == 2
    assert "metrics.json is not an inspect profile" in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(lf.LeanformerError, match="got 1 labels for 2 runs"):
        lf.compare([tiny_bert_dir, tiny_bert_dir], labels=["one"])

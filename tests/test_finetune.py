"""The training loop (resumable, deterministic) and the `finetune` command end to end."""
from __future__ import annotations

import csv
import json
import random

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

import leanformer as lf
from leanformer.cli import main
from leanformer.paths import data_root
from leanformer.tasks import Split, Task, load_task
from leanformer.errors import LeanformerError
from leanformer.models import alias_path
from leanformer.train.loop import TrainConfig, train_classifier

POS, NEG = ["good", "great", "fine", "nice"], ["bad", "awful", "poor", "sad"]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(alias_path("minilm")))


def toy_rows(n: int, seed: int, regression: bool = False) -> list[dict]:
    r = random.Random(seed)
    rows = []
    for _ in range(n):
        y = r.randint(0, 1)
        words = [r.choice(POS if y else NEG) for _ in range(r.randint(2, 6))]
        rows.append({"sentence": " ".join(words), "label": (f"{y * 4.0 + r.random():.3f}" if regression else str(y))})
    return rows


def toy_task(n_train=128, n_dev=32) -> Task:
    tr, dv = toy_rows(n_train, 0), toy_rows(n_dev, 1)
    split = lambda rows: Split([r["sentence"] for r in rows], None, [int(r["label"]) for r in rows])  # noqa: E731
    return Task("toy", split(tr), split(dv), ["0", "1"], ("accuracy",))


def tiny_model(vocab: int, seed=0, num_labels=2):
    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                    intermediate_size=64, vocab_size=vocab, num_labels=num_labels))


def test_trains_and_reports_the_contract_keys(tokenizer):
    model = tiny_model(tokenizer.vocab_size)
    lf.adapt(model, lf.LoRA(rank=4, modules_to_save=["classifier"]))
    m = train_classifier(model, tokenizer, toy_task(),
                         TrainConfig(learning_rate=1e-2, num_train_epochs=3, per_device_train_batch_size=16,
                                     progress=False))
    assert m["accuracy"] >= 0.8  # chance is 0.5; the words decide the label
    for k in ("trainable_params", "total_params", "train_seconds_per_step", "peak_rss_mb"):
        assert m[k] > 0
    assert m["train_steps"] == 3 * 8 and m["trainable_params"] < m["total_params"]


def trainable_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_resume_after_interruption_equals_uninterrupted_run(tokenizer, tmp_path):
    cfg = dict(learning_rate=5e-3, num_train_epochs=2, per_device_train_batch_size=16, progress=False,
               evaluate=False, seed=3)

    def fresh():
        m = tiny_model(tokenizer.vocab_size)  # dropout 0.1 on: RNG state must be restored too
        lf.adapt(m, lf.DyLoRA(rank=4, modules_to_save=["classifier"]))  # per-step random ranks as well
        return m

    ref_model = fresh()
    train_classifier(ref_model, tokenizer, toy_task(), TrainConfig(**cfg))

    def stop_at_11(step, loss):
        if step == 11:
            raise KeyboardInterrupt

    model = fresh()
    run = TrainConfig(**cfg, checkpoint_dir=str(tmp_path / "ck"), save_steps=4)
    with pytest.raises(KeyboardInterrupt):
        train_classifier(model, tokenizer, toy_task(), run, callback=stop_at_11)
    assert json.loads((tmp_path / "ck" / "checkpoint" / "trainer_state.json").read_text())["step"] == 11
    resumed = fresh()  # a new process would start from a new model: everything comes from the checkpoint
    out = train_classifier(resumed, tokenizer, toy_task(), run)
    assert out["train_steps"] == 16
    want, got = trainable_state(ref_model), trainable_state(resumed)
    for n in want:
        torch.testing.assert_close(got[n], want[n], atol=1e-6, rtol=1e-5)

    other = TrainConfig(**{**cfg, "learning_rate": 1e-3}, checkpoint_dir=str(tmp_path / "ck"))
    with pytest.raises(LeanformerError, match="other arguments"):
        train_classifier(fresh(), tokenizer, toy_task(), other)


def test_same_seed_same_result(tokenizer):
    outs = []
    for _ in range(2):
        model = tiny_model(tokenizer.vocab_size)
        lf.adapt(model, lf.LoRAXS(rank=4, modules_to_save=["classifier"]))
        train_classifier(model, tokenizer, toy_task(64, 8), TrainConfig(learning_rate=1e-2, per_device_train_batch_size=16,
                                                                        progress=False, evaluate=False, seed=5))
        outs.append(trainable_state(model))
    for n in outs[0]:
        assert torch.equal(outs[0][n], outs[1][n])


# ------------------------------------------------------------------------------------------------
# The command


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer):
    d = tmp_path_factory.mktemp("tiny")
    tiny_model(tokenizer.vocab_size).bert.save_pretrained(d)  # a base checkpoint: finetune adds the head
    tokenizer.save_pretrained(d)
    return d


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


@pytest.fixture(scope="module")
def csv_task(tmp_path_factory):
    d = tmp_path_factory.mktemp("task")
    return f"{write_csv(d / 'train.csv', toy_rows(96, 0))},{write_csv(d / 'dev.csv', toy_rows(32, 1))}"


FLAGS = ["--num-train-epochs", "2", "--per-device-train-batch-size", "16", "--learning-rate", "1e-2",
         "--max-seq-length", "16", "--no-progress"]


@pytest.mark.parametrize("method", ["lora_xs", "krona"])
def test_finetune_writes_adapter_and_metrics_that_load_and_eval(method, tiny_dir, csv_task, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["finetune", str(tiny_dir), "--task", csv_task, "--method", method, "--rank", "4",
                 "--targets", "all-linear", *FLAGS, "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for k in ("accuracy", "f1", "trainable_params", "total_params", "train_seconds_per_step", "peak_rss_mb"):
        assert k in metrics
    assert not (tmp_path / ".run.checkpoints").exists()  # removed once the result is written
    model, tok = lf.load(out)  # the adapter dir rebuilds base + adapter + trained head
    from leanformer.evaluation import evaluate_task

    assert evaluate_task(model, tok, load_task(csv_task), max_length=16)["accuracy"] == pytest.approx(metrics["accuracy"])
    assert main(["eval", str(out), "--task", csv_task, "--max-seq-length", "16"]) == 0
    # Refuses to overwrite without --overwrite, before training.
    assert main(["finetune", str(tiny_dir), "--task", csv_task, "--out", str(out), *FLAGS]) == 2
    assert "already exists" in capsys.readouterr().err


def test_finetune_full_and_dylora_ranks(tiny_dir, csv_task, tmp_path):
    out = tmp_path / "dy"
    assert main(["finetune", str(tiny_dir), "--task", csv_task, "--method", "dylora", "--rank", "4",
                 "--eval-ranks", "1", "2", *FLAGS, "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["by_rank"]) == {"1", "2"} and "accuracy" in m["by_rank"]["1"]
    out = tmp_path / "full"
    assert main(["finetune", str(tiny_dir), "--task", csv_task, "--method", "full", *FLAGS, "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["trainable_params"] == m["total_params"]
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()


def test_finetune_regression(tiny_dir, tmp_path):
    d = tmp_path
    task = f"{write_csv(d / 'tr.csv', toy_rows(64, 0, True))},{write_csv(d / 'dv.csv', toy_rows(16, 1, True))}"
    assert main(["finetune", str(tiny_dir), "--task", task, "--method", "lora", *FLAGS, "--out", str(d / "o")]) == 0
    m = json.loads((d / "o" / "metrics.json").read_text())
    assert "pearson" in m and "spearman" in m


def test_bad_inputs_give_clear_errors(tiny_dir, csv_task, tmp_path, capsys):
    def err(*argv):
        assert main(["finetune", str(tiny_dir), *argv, *FLAGS, "--out", str(tmp_path / "x")]) == 2
        return capsys.readouterr().err

    assert "attention.self.query" in err("--task", csv_task, "--targets", "q_proj")
    assert "larger than layer" in err("--task", csv_task, "--rank", "64")
    assert "positive" in err("--task", csv_task, "--rank", "0")
    assert "does not divide" in err("--task", csv_task, "--method", "krona", "--krona-a-shape", "3", "4")
    bad = tmp_path / "bad"
    bad.mkdir()
    dev = toy_rows(8, 1)
    dev[0]["label"] = "7"
    t = f"{write_csv(bad / 'train.csv', toy_rows(16, 0))},{write_csv(bad / 'dev.csv', dev)}"
    assert "outside the label set" in err("--task", t)
    cols = f"{write_csv(bad / 'a.csv', [{'txt': 'x', 'y': '1'}])},{write_csv(bad / 'b.csv', [{'txt': 'x', 'y': '1'}])}"
    assert "found columns ['txt', 'y']" in err("--task", cols)
    assert "--eval-ranks applies" in err("--task", csv_task, "--eval-ranks", "2")


@pytest.mark.slow
def test_minilm_sst2_end_to_end(tmp_path):
    root = data_root()
    if root is None:
        pytest.skip("shared data not found (set LEANFORMER_DATA): needs glue/SST-2")
    out = tmp_path / "sst2"
    assert main(["finetune", "minilm", "--task", str(root / "glue" / "SST-2"), "--method", "lora_xs", "--rank", "4",
                 "--max-train-samples", "64", "--max-steps", "2", "--max-eval-samples", "32",
                 "--max-seq-length", "32", "--no-progress", "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["trainable_params"] == 2 * 6 * 16 + 384 * 2 + 2 and 0 <= m["accuracy"] <= 1

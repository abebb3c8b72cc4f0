"""Fine-tuning on transformers.Trainer (resumable, deterministic), adapted models under a plain
Trainer, the `finetune` command end to end, and two processes."""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import random
import signal
import subprocess
import sys

import pytest
import torch
from transformers import (AutoTokenizer, BertConfig, BertForSequenceClassification, DataCollatorWithPadding, Trainer,
                          TrainerCallback, TrainingArguments)

import leanformer as lf
from leanformer.train import finetuning
from leanformer.cli import main
from leanformer.errors import LeanformerError
from leanformer.models import alias_path
from leanformer.paths import data_root
from leanformer.tasks import Split, Task, load_task
from leanformer.train.callbacks import TrainingInterrupted
from leanformer.train.finetuning import encode_split

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


def training_args(out, **kw) -> TrainingArguments:
    base = dict(output_dir=str(out), learning_rate=1e-2, num_train_epochs=3, per_device_train_batch_size=16,
                save_strategy="no", disable_tqdm=True, report_to="none", logging_strategy="no", use_cpu=True)
    return TrainingArguments(**{**base, **kw})


def trainable_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_trains_and_reports_the_contract_keys(tokenizer, tmp_path):
    model = tiny_model(tokenizer.vocab_size)
    m = lf.finetune(model, tokenizer, toy_task(), training_args(tmp_path, learning_rate=3e-2), method=lf.LoRA(rank=4))
    assert m["accuracy"] >= 0.9 and m["train_loss"] < 0.6  # chance: 0.5, log 2 = 0.69; the words decide the label
    for k in ("trainable_params", "total_params", "train_seconds_per_step", "peak_rss_mb", "train_loss"):
        assert m[k] > 0
    assert m["train_steps"] == 3 * 8 and m["train_samples"] == 128 and m["processes"] == 1
    assert m["trainable_params"] == 2 * 2 * 4 * (32 + 32) + 32 * 2 + 2  # LoRA on query/value + the head it adds
    assert not model.training


def test_full_fine_tuning_and_head_learning_rate_from_the_api(tokenizer, tmp_path):
    model = tiny_model(tokenizer.vocab_size)
    for p in model.parameters():
        p.requires_grad_(False)  # "full" unfreezes everything
    m = lf.finetune(model, tokenizer, toy_task(64, 8), training_args(tmp_path, num_train_epochs=1, learning_rate=1e-3),
                    method="full", head_learning_rate=5e-2, evaluate=False)
    assert m["trainable_params"] == m["total_params"] and "accuracy" not in m
    with pytest.raises(LeanformerError, match="no trainable parameters"):
        frozen = tiny_model(tokenizer.vocab_size)
        for p in frozen.parameters():
            p.requires_grad_(False)
        lf.finetune(frozen, tokenizer, toy_task(16, 4), training_args(tmp_path))
    with pytest.raises(LeanformerError, match="head has 3 outputs but task toy has 2"):
        lf.finetune(tiny_model(tokenizer.vocab_size, num_labels=3), tokenizer, toy_task(16, 4), training_args(tmp_path))


def test_head_gets_its_own_learning_rate(tokenizer, tmp_path):
    from leanformer.train.finetuning import TaskTrainer

    model = tiny_model(tokenizer.vocab_size)
    lf.adapt(model, lf.LoRA(rank=4, modules_to_save=["classifier"]))
    trainer = TaskTrainer(model=model, args=training_args(tmp_path, learning_rate=1e-3), head_learning_rate=3e-2)
    groups = trainer.create_optimizer().param_groups
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert lr_of[id(model.classifier.weight)] == 3e-2
    assert lr_of[id(model.bert.encoder.layer[0].attention.self.query.adapters["default"].lora_A)] == 1e-3
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in model.parameters())


class SigtermDuringStep(TrainerCallback):
    """Sends this process SIGTERM while optimizer step `step` runs (as a scheduler would)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def test_resume_after_interruption_equals_uninterrupted_run(tokenizer, tmp_path):
    def args(**kw):
        return training_args(tmp_path / "ck", **{**dict(learning_rate=5e-3, num_train_epochs=2, seed=3, save_steps=4,
                                                      save_strategy="steps", train_sampling_strategy="group_by_length"),
                                                 **kw})

    def fresh():
        m = tiny_model(tokenizer.vocab_size)  # dropout 0.1 on: RNG state must be restored too
        lf.adapt(m, lf.DyLoRA(rank=4, modules_to_save=["classifier"]))  # per-step random ranks as well
        return m

    ref_model = fresh()
    ref = lf.finetune(ref_model, tokenizer, toy_task(), args(output_dir=str(tmp_path / "ref")), evaluate=False)
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingInterrupted, match="SIGTERM: stopped after step 11 of 16"):
        lf.finetune(fresh(), tokenizer, toy_task(), args(), evaluate=False, callbacks=[SigtermDuringStep(11)])
    assert signal.getsignal(signal.SIGTERM) is handler  # restored
    assert sorted(os.listdir(tmp_path / "ck")) == ["checkpoint-11", "checkpoint-4", "checkpoint-8"]
    assert json.loads((tmp_path / "ck" / "checkpoint-11" / "trainer_state.json").read_text())["global_step"] == 11
    resumed = fresh()  # a new process would start from a new model: everything comes from the checkpoint
    out = lf.finetune(resumed, tokenizer, toy_task(), args(), evaluate=False, resume_from_checkpoint=True)
    assert out["train_steps"] == 16 and out["train_loss"] == ref["train_loss"]  # the step log is restored too
    want, got = trainable_state(ref_model), trainable_state(resumed)
    for n in want:
        assert torch.equal(got[n], want[n]), n  # bit for bit

    with pytest.raises(LeanformerError, match="other arguments.*learning_rate: checkpoint 0.005, now 0.001"):
        lf.finetune(fresh(), tokenizer, toy_task(), args(learning_rate=1e-3), evaluate=False,
                    resume_from_checkpoint=True)


def test_same_seed_same_result_other_seed_other_result(tokenizer, tmp_path):
    def train(seed):
        model = tiny_model(tokenizer.vocab_size)
        lf.adapt(model, lf.LoRAXS(rank=4, modules_to_save=["classifier"]))
        lf.finetune(model, tokenizer, toy_task(64, 8), training_args(tmp_path, num_train_epochs=1, seed=seed),
                    evaluate=False)
        return trainable_state(model)

    a, b, c = train(5), train(5), train(6)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not all(torch.equal(a[n], c[n]) for n in a)


def test_adapted_model_trains_and_resumes_under_a_plain_trainer(tokenizer, tmp_path):
    """What peft models do: a user's own Trainer trains an lf.adapt-ed model, and resumes it."""
    rows = encode_split(tokenizer, toy_task().train, list(range(128)), 32)

    def run(resume=None):
        model = tiny_model(tokenizer.vocab_size)
        lf.adapt(model, lf.LoRA(rank=4, modules_to_save=["classifier"]))
        frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
        start = trainable_state(model)
        args = TrainingArguments(output_dir=str(tmp_path / "plain"), learning_rate=3e-2, num_train_epochs=3,
                                 per_device_train_batch_size=16, save_steps=8, logging_steps=1, report_to="none",
                                 disable_tqdm=True, use_cpu=True, seed=0)
        trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=DataCollatorWithPadding(tokenizer))
        trainer.train(resume_from_checkpoint=resume)
        assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
        assert all(not torch.equal(p, start[n]) for n, p in trainable_state(model).items())
        return model, [h["loss"] for h in trainer.state.log_history if "loss" in h]

    model, losses = run()
    assert len(losses) == 24 and sum(losses[-4:]) < 0.6 * sum(losses[:4]), losses  # base frozen, loss falls
    resumed, _ = run(resume=str(tmp_path / "plain" / "checkpoint-8"))
    want, got = trainable_state(model), trainable_state(resumed)
    assert all(torch.equal(got[n], want[n]) for n in want)


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
         "--max-seq-length", "16", "--disable-tqdm", "true"]


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


def test_finetune_command_resumes_after_sigterm(tiny_dir, csv_task, tmp_path, monkeypatch, capsys):
    argv = ["finetune", str(tiny_dir), "--task", csv_task, "--method", "lora", "--save-steps", "2", *FLAGS]
    assert main([*argv, "--out", str(tmp_path / "straight")]) == 0
    real = finetuning.finetune  # the command imports it when it runs
    monkeypatch.setattr(finetuning, "finetune", lambda *a, **k: real(*a, **k, callbacks=[SigtermDuringStep(5)]))
    assert main([*argv, "--out", str(tmp_path / "run")]) == 130
    assert "stopped after step 5 of 12" in capsys.readouterr().err
    assert not (tmp_path / "run").exists() and (tmp_path / ".run.checkpoints" / "checkpoint-5").is_dir()
    monkeypatch.undo()
    assert main([*argv, "--out", str(tmp_path / "run")]) == 0  # the same command continues
    assert "resuming from" in capsys.readouterr().out and not (tmp_path / ".run.checkpoints").exists()
    straight, resumed = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("straight", "run"))
    for k in ("accuracy", "f1", "train_loss", "train_steps"):
        assert resumed[k] == straight[k], k


def test_two_processes(tiny_dir, csv_task, tmp_path):
    """The command as `torchrun --nproc_per_node 2 -m leanformer.cli finetune …` (gloo on the CPU)."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "leanformer.cli", "finetune", str(tiny_dir), "--task", csv_task, "--method", "lora", *FLAGS,
           "--device", "cpu", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["processes"] == 2 and math.isfinite(m["train_loss"]) and m["train_loss"] > 0
    assert m["train_steps"] == 2 * math.ceil(96 / (16 * 2))  # each step takes one batch per process
    assert not (tmp_path / ".ddp.checkpoints").exists()


@pytest.mark.slow
def test_minilm_sst2_end_to_end(tmp_path):
    root = data_root()
    if root is None:
        pytest.skip("shared data not found (set LEANFORMER_DATA): needs glue/SST-2")
    out = tmp_path / "sst2"
    assert main(["finetune", "minilm", "--task", str(root / "glue" / "SST-2"), "--method", "lora_xs", "--rank", "4",
                 "--max-train-samples", "64", "--max-steps", "2", "--max-eval-samples", "32",
                 "--max-seq-length", "32", "--disable-tqdm", "true", "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    # the recipe's targets: query, value, attention.output.dense, output.dense (roles q, v, o, mlp_out)
    assert m["trainable_params"] == 4 * 6 * 16 + 384 * 2 + 2 and m["train_steps"] == 2 and m["train_samples"] == 64
    assert m["settings"]["source"]["targets"] == "recipe" and m["task_layout"].startswith("GLUE SST-2")
    # the saved adapter reproduces the reported accuracy on exactly the 32 evaluated sentences
    model, tok = lf.load(out)
    from leanformer.evaluation import evaluate_task

    again = evaluate_task(model, tok, load_task(str(root / "glue" / "SST-2")), max_length=32, max_samples=32)
    assert again["accuracy"] == m["accuracy"] and (m["accuracy"] * 32).is_integer()


# ---------------------------------------------------------------------------------------------
# Recipes, --learning-rate auto, training you can see, same seed same result

VOLATILE = ("train_seconds_per_step", "peak_rss_mb", "wall_seconds", "optimizer_state_bytes")


def test_recipe_values_are_used_unless_a_flag_overrides(tiny_dir, csv_task, tmp_path):
    base = ["--num-train-epochs", "1", "--max-seq-length", "16", "--disable-tqdm", "true"]
    out = tmp_path / "recipe"
    assert main(["finetune", str(tiny_dir), "--task", csv_task, "--method", "lora_xs", "--rank", "4", *base,
                 "--out", str(out)]) == 0
    s = json.loads((out / "metrics.json").read_text())["settings"]
    r = lf.LoRAXS.recipe
    assert (s["learning_rate"], s["head_learning_rate"], s["alpha"], s["weight_decay"], s["warmup_steps"]) == \
        (r.learning_rate, r.head_learning_rate, r.alpha, r.weight_decay, r.warmup_ratio)
    assert set(s["source"].values()) == {"recipe"} and "LoRA-XS" in s["recipe"]["source"]
    out = tmp_path / "flags"
    assert main(["finetune", str(tiny_dir), "--task", csv_task, "--method", "lora_xs", "--rank", "4", *base,
                 "--learning-rate", "3e-3", "--alpha", "4", "--weight-decay", "0", "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert (m["settings"]["learning_rate"], m["settings"]["alpha"], m["settings"]["weight_decay"]) == (3e-3, 4, 0)
    assert m["settings"]["source"]["learning_rate"] == "flag" and m["settings"]["source"]["warmup_steps"] == "recipe"
    assert m["learning_rate"] == 3e-3


def test_learning_rate_auto_runs_a_range_test_on_training_batches(tiny_dir, tmp_path):
    d = tmp_path
    task = f"{write_csv(d / 'tr.csv', toy_rows(200, 0))},{write_csv(d / 'dv.csv', toy_rows(16, 1))}"
    out = d / "auto"
    assert main(["finetune", str(tiny_dir), "--task", task, "--method", "lora", "--learning-rate", "auto",
                 "--per-device-train-batch-size", "4", "--max-steps", "8", "--max-seq-length", "16",
                 "--disable-tqdm", "true", "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    t = m["learning_rate_test"]
    assert m["settings"]["source"]["learning_rate"] == "auto" and m["learning_rate"] == t["learning_rate"]
    assert 1e-6 <= t["learning_rate"] <= 0.1 and len(t["probe_losses"]) == len(t["lrs"]) <= 40
    if not t["flat"]:  # the pick reads the probe (fixed held-out training examples), not the noisy batch losses
        assert min(t["probe_losses"]) < t["probe_start"] and t["learning_rate"] == pytest.approx(t["min_loss_lr"] / 10)
    assert t["lrs"] == sorted(t["lrs"]) and (out / "lr_range_test.png").is_file()


def test_range_test_pick_reads_the_valley_and_refuses_a_noise_minimum():
    from leanformer.train.lr_finder import pick

    lrs = [1e-6 * 10 ** (i / 4) for i in range(25)]  # 1e-6 … 1
    valley = [0.69] * 12 + [0.6, 0.5, 0.4, 0.3, 0.35, 0.9, 2.0, 5.0] + [9.0] * 5
    lr, at_min, flat = pick(lrs, 0.69, valley)
    assert (at_min, flat) == (lrs[15], False) and lr == pytest.approx(lrs[15] / 10)
    noise = [0.6931 + 0.0005 * ((-1) ** i) for i in range(18)] + [0.70, 0.74, 0.8, 1.2, 2.0, 3.0, 4.0]
    lr, at_min, flat = pick(lrs, 0.6931, noise)  # the minimum (step 1) is noise: take the last stable rate
    assert flat and at_min == lrs[1] and lr == pytest.approx(lrs[19] / 10)
    # past the edge (the first rise of 10 % above the start) the loss swings: a lucky dip there is not the pick
    swinging = [0.6931] * 15 + [0.80, 0.60, 1.3, 0.9, 2.0] + [5.0] * 5
    lr, at_min, flat = pick(lrs, 0.6931, swinging)
    assert flat and lr == pytest.approx(lrs[14] / 10)


def test_learning_rate_auto_on_a_task_too_small_says_how_many_batches(tiny_dir, csv_task, tmp_path, capsys):
    assert main(["finetune", str(tiny_dir), "--task", csv_task, "--learning-rate", "auto", *FLAGS[:4],
                 "--max-seq-length", "16", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "40 training batches plus 2 held out" in err and "only 6 batch(es) of 16" in err and "at least 672" in err


def test_loss_curve_periodic_eval_and_a_warning_when_the_loss_does_not_move(tiny_dir, csv_task, tmp_path):
    out = tmp_path / "flat"
    with pytest.warns(UserWarning, match="has not moved"):
        assert main(["finetune", str(tiny_dir), "--task", csv_task, "--method", "lora", "--learning-rate", "1e-9",
                     "--num-train-epochs", "3", "--per-device-train-batch-size", "16", "--logging-steps", "3",
                     "--eval-steps", "5", "--max-seq-length", "16", "--disable-tqdm", "true", "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["loss_curve"]["every"] == 3 and m["loss_curve"]["step"] == [3, 6, 9, 12, 15, 18]
    assert [e["step"] for e in m["eval_curve"]] == [5, 10, 15] and "accuracy" in m["eval_curve"][0]
    assert "--learning-rate auto" in m["warnings"][0] and (out / "loss_curve.png").is_file()


@pytest.mark.parametrize("losses, warned", [([0.69] * 10, True), ([0.69, 0.70, 0.68, 0.69] * 3, True),
                                            ([0.69 - 0.02 * i for i in range(12)], False)])
def test_stall_warning_fires_only_when_the_loss_has_not_moved_by_a_third(losses, warned):
    from types import SimpleNamespace

    from leanformer.train.callbacks import StallWarning, StepLog

    log = StepLog()
    stall = StallWarning(log, learning_rate=1e-4)
    for step, loss in enumerate(losses, 1):
        log.losses.append(loss)
        stall.on_step_end(None, SimpleNamespace(global_step=step, max_steps=3 * len(losses) // 2 * 2), None)
    assert (stall.message is not None) == warned


def test_same_command_twice_in_new_processes_gives_identical_metrics(tiny_dir, csv_task, tmp_path):
    """Everything random (head and adapter initialisation, dropout, batch order, DyLoRA's rank draws)
    follows --seed: two fresh processes agree to the last bit."""
    results = []
    for i in range(2):
        out = tmp_path / f"run{i}"
        cmd = [sys.executable, "-m", "leanformer.cli", "finetune", str(tiny_dir), "--task", csv_task, "--method",
               "dylora", "--rank", "4", *FLAGS, "--seed", "3", "--out", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "PYTHONHASHSEED": str(i)})  # hash order must not matter
        assert proc.returncode == 0, proc.stderr[-3000:]
        m = json.loads((out / "metrics.json").read_text())
        results.append({k: v for k, v in m.items() if k not in VOLATILE})
    assert results[0] == results[1]


def _recipe_run(method: str, shared_data, steps: int, seed: int = 0, learning_rate: float | None = None) -> list[float]:
    """Per-step training losses of minilm on SST-2 training sentences with `method`'s default recipe
    (its learning rates, targets, scale, warm-up and weight decay, as `leanformer finetune` uses them)."""
    from transformers import TrainingArguments, set_seed

    from leanformer.architectures import adapter_targets

    task = load_task(str(shared_data / "glue" / "SST-2"))
    set_seed(seed)
    model, tok = lf.load("minilm", head="sequence-classification", num_labels=2)
    cls = {"lora": lf.LoRA, "lora_xs": lf.LoRAXS, "krona": lf.KronA}[method]
    recipe = cls.recipe if learning_rate is None else dataclasses.replace(cls.recipe, learning_rate=learning_rate)
    kwargs = dict(targets=adapter_targets(model, recipe.roles), alpha=recipe.alpha)
    cfg = cls(**kwargs) if cls is lf.KronA else cls(rank=16 if method == "lora_xs" else 8, **kwargs)
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        args = TrainingArguments(output_dir=scratch, max_steps=steps, per_device_train_batch_size=16, seed=seed,
                                 save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=True,
                                 logging_steps=1, **recipe.training_arguments())
        m = lf.finetune(model, tok, task, args, method=cfg, max_seq_length=32, max_train_samples=16 * steps,
                        head_learning_rate=recipe.head_learning_rate, evaluate=False, loss_every=1)
    return m["loss_curve"]["loss"]


@pytest.mark.slow
def test_lora_xs_and_krona_learn_a_small_real_task_as_lora_does(shared_data):
    """Regression test for LoRA-XS / KronA sitting at ln 2 (a constant prediction) where LoRA learns:
    with their default recipes each lowers the SST-2 training loss within a short run by at least half
    of what LoRA does with its own (short-budget) recipe."""
    steps = 30
    drop = {}
    for method, lr in (("lora", None), ("lora_xs", None), ("krona", None)):
        losses = _recipe_run(method, shared_data, steps, learning_rate=lr)
        drop[method] = sum(losses[:8]) / 8 - sum(losses[-8:]) / 8
    assert drop["lora"] > 0.03, drop
    assert drop["lora_xs"] >= 0.5 * drop["lora"] and drop["krona"] >= 0.5 * drop["lora"], drop

"""Early exit (dynamic/early_exit.py): exits at the thresholds' ends, batched exits with dropped rows
equal to one-by-one inference, the cascade's detached input, the ensemble, training through
finetune with a frozen backbone, save/load, errors, and the finetune → eval --tau commands."""
from __future__ import annotations

import copy
import json
import random

import pytest
import torch
from torch.nn import functional as F
from transformers import TrainingArguments

import leanformer as lf
from leanformer import dynamic
from leanformer.cli import main
from leanformer.dynamic.early_exit import GeometricEnsemble, all_exits, exit_logits, last_exits, prepare_training
from leanformer.errors import LeanformerError
from leanformer.evaluation import evaluate_task
from leanformer.tasks import Split, Task

POS, NEG = ["good", "great", "fine", "nice"], ["bad", "awful", "poor", "sad"]


def classifier(make_tiny_bert, layers=4, **config):
    return make_tiny_bert(layers=layers, head="sequence-classification", **config)


def padded_batch(n=8, seq=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 100, (n, seq), generator=g)
    mask = torch.ones_like(ids)
    for row in range(n):
        mask[row, int(torch.randint(3, seq + 1, (1,), generator=g)):] = 0
    return ids, mask


def every_exit(model, ids, mask):
    with torch.no_grad(), all_exits(model):
        return exit_logits(model, model(input_ids=ids, attention_mask=mask).logits)


def median_confidence(outs) -> float:
    return float(torch.stack([o.softmax(-1).amax(-1) for o in outs[:-1]]).median())


def test_tau_one_is_the_dense_model_exactly(make_tiny_bert):
    model = classifier(make_tiny_bert)
    dense = copy.deepcopy(model)
    lf.early_exit(model, lf.EarlyExit(kind="ztw", tau=1.0))
    ids, mask = padded_batch()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, dense(input_ids=ids, attention_mask=mask).logits)
    assert last_exits(model).tolist() == [4] * len(ids)
    c = dynamic.cost(model)
    assert c["flops_per_token"] == 1.0 and c["mlp_flops_per_token"] == 1.0  # τ = 1 runs no IC at all
    assert c["exit_counts"] == [0, 0, 0, len(ids)] and c["tokens"] == int(mask.sum())


def test_tau_zero_exits_everything_at_the_first_ic(make_tiny_bert):
    model = classifier(make_tiny_bert)
    lf.early_exit(model, kind="plain", tau=0.0)
    ids, mask = padded_batch()
    outs = every_exit(model, ids, mask)
    calls = []
    handle = lf.architectures.find_blocks(model)[0][1].register_forward_pre_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    handle.remove()
    assert last_exits(model).tolist() == [1] * len(ids) and not calls  # block 2 never ran
    torch.testing.assert_close(logits, outs[0])
    c = dynamic.cost(model)
    assert c["mlp_flops_per_token"] == pytest.approx(0.25) and c["layers_executed"] == pytest.approx(0.25)
    assert 0.25 < c["flops_per_token"] < 0.26  # one block of four plus one IC


@pytest.mark.parametrize("kind", ["ztw", "plain"])
def test_batched_exits_drop_rows_and_equal_one_by_one(make_tiny_bert, kind):
    model = classifier(make_tiny_bert)
    lf.early_exit(model, kind=kind)
    ids, mask = padded_batch(n=12)
    outs = every_exit(model, ids, mask)
    tau = median_confidence(outs)
    dynamic.set_tau(model, tau)
    seen = []  # rows each block runs on
    blocks, _ = lf.architectures.find_blocks(model)
    handles = [b.register_forward_pre_hook(lambda _m, args, kwargs: seen.append(len(args[0] if args else kwargs["hidden_states"])),
                                           with_kwargs=True) for b in blocks]
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    for h in handles:
        h.remove()
    exits = last_exits(model).tolist()
    assert 1 < len(set(exits))  # the threshold splits the batch
    assert seen == [sum(e > k for e in exits) for k in range(len(seen))]  # exited rows left the batch
    for row, e in enumerate(exits):  # the rule: the first exit whose max probability exceeds τ
        first = next((k for k, o in enumerate(outs[:-1]) if o[row].softmax(-1).max() > tau), len(outs) - 1)
        assert e == first + 1
        torch.testing.assert_close(logits[row], outs[first][row])
        n = int(mask[row].sum())
        with torch.no_grad():
            alone = model(input_ids=ids[row:row + 1, :n], attention_mask=mask[row:row + 1, :n]).logits[0]
        assert last_exits(model).tolist() == [e]
        torch.testing.assert_close(alone, logits[row], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["distilbert", "roberta"])
def test_other_encoders_exit_batched_as_one_by_one(arch):
    from transformers import (DistilBertConfig, DistilBertForSequenceClassification, RobertaConfig,
                              RobertaForSequenceClassification)

    torch.manual_seed(0)
    model = (DistilBertForSequenceClassification(DistilBertConfig(vocab_size=100, dim=32, n_layers=4, n_heads=2,
                                                                  hidden_dim=64)) if arch == "distilbert" else
             RobertaForSequenceClassification(RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=4,
                                                            num_attention_heads=2, intermediate_size=64,
                                                            max_position_embeddings=64))).eval()
    lf.early_exit(model, kind="ztw")
    ids, mask = padded_batch(n=10)
    dynamic.set_tau(model, median_confidence(every_exit(model, ids, mask)))
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    exits = last_exits(model).tolist()
    assert 1 < len(set(exits))
    for row, e in enumerate(exits):
        n = int(mask[row].sum())
        with torch.no_grad():
            alone = model(input_ids=ids[row:row + 1, :n], attention_mask=mask[row:row + 1, :n]).logits[0]
        assert last_exits(model).tolist() == [e]
        torch.testing.assert_close(alone, logits[row], atol=1e-5, rtol=1e-5)


def test_cascade_reads_detached_logits_of_the_previous_ic(make_tiny_bert):
    model = classifier(make_tiny_bert)
    heads = prepare_training(model, lf.EarlyExit(kind="ztw"), train_backbone=False)
    model.train()
    ids, mask = padded_batch()
    model(input_ids=ids, attention_mask=mask)
    collected = heads.collected
    F.cross_entropy(collected.ic_logits[1], torch.zeros(len(ids), dtype=torch.long)).backward()
    assert all(p.grad is None for p in heads.ics[0].parameters())  # IC 1's loss trains nothing of IC 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in heads.ics[1].parameters())
    assert heads.ics[1].fc.in_features == 32 + 2 and heads.ics[0].fc.in_features == 32


def test_geometric_ensemble_is_the_papers_normalised_weighted_mean():
    torch.manual_seed(0)
    ens = GeometricEnsemble(3, 4)
    with torch.no_grad():
        ens.weight.copy_(torch.tensor([0.3, -0.2, 0.1]))
        ens.bias.copy_(torch.tensor([0.1, 0.0, -0.1, 0.2]))
    log_p = torch.randn(5, 3, 4).log_softmax(-1)
    q = ens(log_p)
    expected = sum(torch.tensor([0.3, -0.2, 0.1])[j].exp() * log_p[:, j] for j in range(3)) / 3 + ens.bias
    torch.testing.assert_close(q, expected)
    torch.testing.assert_close(q.softmax(-1).sum(-1), torch.ones(5))


def toy_task(n_train=96, n_dev=32) -> Task:
    def split(n, seed):
        r = random.Random(seed)
        labels = [r.randint(0, 1) for _ in range(n)]
        return Split([" ".join(r.choice(POS if y else NEG) for _ in range(r.randint(2, 6))) for y in labels], None, labels)
    return Task("toy", split(n_train, 0), split(n_dev, 1), ["0", "1"], ("accuracy",))


def training_args(out, learning_rate=1e-2, epochs=1):
    return TrainingArguments(output_dir=str(out), learning_rate=learning_rate, num_train_epochs=epochs,
                             per_device_train_batch_size=16, save_strategy="no", disable_tqdm=True, report_to="none",
                             logging_strategy="no", use_cpu=True)


def test_finetune_trains_heads_then_ensembles_with_the_backbone_frozen(make_tiny_bert, tokenizer, tmp_path):
    model = make_tiny_bert(layers=3, head="sequence-classification", vocab_size=tokenizer.vocab_size)
    dense = lf.finetune(model, tokenizer, toy_task(), training_args(tmp_path / "a", 3e-3, 2), method="full",
                        max_seq_length=16)
    backbone = {n: p.detach().clone() for n, p in model.named_parameters()}
    heads = lf.early_exit(model, kind="ztw", tau=0.9)
    ics = copy.deepcopy(heads.ics.state_dict())
    ensembles = copy.deepcopy(heads.ensembles.state_dict())
    metrics = lf.finetune(model, tokenizer, toy_task(), training_args(tmp_path / "b", epochs=3),
                          early_exit=lf.EarlyExit(kind="ztw", tau=0.9), max_seq_length=16)
    assert all(torch.equal(p, backbone[n]) for n, p in model.named_parameters() if n in backbone)
    assert all(not torch.equal(v, heads.ics.state_dict()[k]) for k, v in ics.items())
    assert all(not torch.equal(v, heads.ensembles.state_dict()[k]) for k, v in ensembles.items())
    ee = metrics["early_exit"]
    assert len(ee["exit_accuracy"]) == 3 and ee["ensemble_train_steps"] == metrics["train_steps"] == 18
    assert metrics["trainable_params"] == sum(p.numel() for p in heads.ics.parameters())
    # the exits learned: block 2's exit is as good as the model, so with τ below the median of its confidence
    # at least half the examples leave there and accuracy holds (the mean-form ensemble's confidence is modest
    # after a short run at lr 1e-4, so τ is read from it rather than fixed)
    assert dense["accuracy"] >= 0.9 and ee["exit_accuracy"][1] >= 0.9
    enc = tokenizer(toy_task().dev.text_a, padding=True, return_tensors="pt")
    with torch.no_grad(), all_exits(model):
        outs = exit_logits(model, model(**enc).logits)
    dynamic.set_tau(model, float(outs[1].softmax(-1).amax(-1).median()) - 1e-6)
    dynamic.reset_cost(model)
    assert evaluate_task(model, tokenizer, toy_task(), max_length=16)["accuracy"] >= dense["accuracy"] - 1 / 32
    assert dynamic.cost(model)["layers_executed"] < 0.9


def test_finetune_trains_exits_jointly_when_a_method_is_given(make_tiny_bert, tokenizer, tmp_path):
    model = make_tiny_bert(layers=3, head="sequence-classification", vocab_size=tokenizer.vocab_size)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    metrics = lf.finetune(model, tokenizer, toy_task(), training_args(tmp_path / "ck"), method=lf.LoRA(rank=2), early_exit=lf.EarlyExit(kind="plain"),
                          max_seq_length=16)
    changed = {n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])}
    assert any("classifier" in n for n in changed)  # the model's head trains with the exits (its loss is in the mean)
    assert any(".adapters." in n and p.requires_grad for n, p in model.named_parameters())
    assert "ensemble_train_steps" not in metrics["early_exit"]  # plain: no ensemble phase
    assert [e.transform for e in lf.applied(model)] == ["adapt", "early_exit"]
    lf.save(model, tokenizer, tmp_path / "joint")
    loaded, _ = lf.load(tmp_path / "joint")
    ids, mask = padded_batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits,
                                   model(input_ids=ids, attention_mask=mask).logits)


def test_save_and_load_round_trip(make_tiny_bert, tmp_path):
    model = classifier(make_tiny_bert)
    lf.early_exit(model, kind="ztw")
    ids, mask = padded_batch()
    dynamic.set_tau(model, median_confidence(every_exit(model, ids, mask)))
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    exits = last_exits(model)
    lf.save(model, None, tmp_path / "ee")
    meta = json.loads((tmp_path / "ee" / "leanformer.json").read_text())
    assert [e["transform"] for e in meta["transforms"]] == ["early_exit"]
    assert meta["transforms"][0]["config"]["tau"] == model.early_exit.tau
    loaded, _ = lf.load(tmp_path / "ee")
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits, logits)
    assert torch.equal(last_exits(loaded), exits)
    # the recorded base no longer matches what the heads were trained on: a clear error
    meta["transforms"][0]["state"]["blocks"] = 6
    (tmp_path / "ee" / "leanformer.json").write_text(json.dumps(meta))
    with pytest.raises(LeanformerError, match="trained on a base with 6 blocks"):
        lf.load(tmp_path / "ee")


def test_bad_input_gives_clear_errors(make_tiny_bert, make_tiny_llama):
    with pytest.raises(LeanformerError, match=r"τ must be in \[0, 1\]"):
        lf.EarlyExit(tau=1.5)
    with pytest.raises(LeanformerError, match="unknown early-exit kind 'sdn'; choose from ztw, plain"):
        lf.EarlyExit(kind="sdn")
    with pytest.raises(LeanformerError, match="no classification head"):
        lf.early_exit(make_tiny_bert(layers=2), lf.EarlyExit())
    from transformers import LlamaForSequenceClassification

    llama = LlamaForSequenceClassification(make_tiny_llama(layers=2).config)
    with pytest.raises(LeanformerError, match="not one of the supported encoders bert"):
        lf.early_exit(llama, lf.EarlyExit())
    with pytest.raises(LeanformerError, match="regression"):
        lf.early_exit(classifier(make_tiny_bert, num_labels=1), lf.EarlyExit())
    model = classifier(make_tiny_bert)
    with pytest.raises(LeanformerError, match="not a dynamic-inference model"):
        dynamic.set_tau(model, 0.5)
    lf.early_exit(model, lf.EarlyExit())
    with pytest.raises(LeanformerError, match=r"τ must be in \[0, 1\]"):
        dynamic.set_tau(model, -0.1)
    with pytest.raises(LeanformerError, match="already has early exits"):
        lf.early_exit(model, lf.EarlyExit())


def test_finetune_early_exit_then_eval_tau_commands(tiny_bert_dir, tmp_path, capsys):
    task = toy_task()
    paths = []
    for name, split in (("train", task.train), ("dev", task.dev)):
        rows = ["sentence,label"] + [f"{t},{y}" for t, y in zip(split.text_a, split.labels)]
        (tmp_path / f"{name}.csv").write_text("\n".join(rows) + "\n")
        paths.append(str(tmp_path / f"{name}.csv"))
    task_arg = ",".join(paths)
    out = tmp_path / "ztw"
    assert main(["finetune", str(tiny_bert_dir), "--task", task_arg, "--early-exit", "ztw", "--exit-tau", "0.7",
                 "--num-train-epochs", "1", "--per-device-train-batch-size", "16", "--max-seq-length", "16",
                 "--disable-tqdm", "true", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["learning_rate"] == 1e-3 and metrics["early_exit"]["tau"] == 0.7
    assert len(metrics["early_exit"]["exit_accuracy"]) == 3
    assert main(["eval", str(out), "--task", task_arg, "--tau", "0", "--max-seq-length", "16",
                 "--out", str(tmp_path / "e0")]) == 0
    at_zero = json.loads((tmp_path / "e0" / "metrics.json").read_text())
    assert at_zero["exit_counts"] == [32, 0, 0] and at_zero["layers_executed"] == pytest.approx(1 / 3)
    assert at_zero["latency_seconds"] > 0 and 0 <= at_zero["accuracy"] <= 1
    assert main(["eval", str(out), "--task", task_arg, "--tau-sweep", "1", "0.5", "--max-seq-length", "16",
                 "--out", str(tmp_path / "sweep")]) == 0
    sweep = json.loads((tmp_path / "sweep" / "metrics.json").read_text())["sweep"]
    assert sweep[0]["flops_per_token"] == 1.0 and sweep[0]["exit_counts"] == [0, 0, 32]
    assert (tmp_path / "sweep" / "tau_sweep.png").is_file()
    assert main(["finetune", str(tiny_bert_dir), "--task", task_arg, "--early-exit", "ztw", "--exit-tau", "2",
                 "--out", str(tmp_path / "bad")]) == 2
    assert "τ must be in [0, 1]" in capsys.readouterr().err


def test_two_processes_train_the_exits(tiny_bert_dir, tmp_path):
    """`torchrun --nproc_per_node 2 -m leanformer.cli finetune … --early-exit ztw` (gloo on the CPU): DDP
    must see the heads as used parameters in both phases (the exits' loss is the model's output)."""
    import os
    import subprocess
    import sys

    task = toy_task(n_train=64, n_dev=16)
    paths = []
    for name, split in (("train", task.train), ("dev", task.dev)):
        (tmp_path / f"{name}.csv").write_text("\n".join(["sentence,label"] + [f"{t},{y}" for t, y in
                                                                              zip(split.text_a, split.labels)]) + "\n")
        paths.append(str(tmp_path / f"{name}.csv"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "leanformer.cli",
           "finetune", str(tiny_bert_dir), "--task", ",".join(paths), "--early-exit", "ztw", "--num-train-epochs", "1",
           "--per-device-train-batch-size", "16", "--max-seq-length", "16", "--disable-tqdm", "true", "--device", "cpu",
           "--out", str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert m["processes"] == 2 and m["train_steps"] == 2 and m["early_exit"]["ensemble_train_steps"] == 2


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_an_exit_reads_only_its_rows_unpadded_tokens(make_tiny_bert, pooling):
    """Padding never reaches a mean-pooled IC: a row's exits are the same alone (no padding) as inside a
    padded batch, and with the cls pooling they read the first token only."""
    model = classifier(make_tiny_bert)
    lf.early_exit(model, lf.EarlyExit(kind="ztw", tau=0.0, pooling=pooling))
    model.eval()
    ids, mask = padded_batch()
    batched = every_exit(model, ids, mask)
    for row in range(len(ids)):
        n = int(mask[row].sum())
        alone = every_exit(model, ids[row:row + 1, :n], mask[row:row + 1, :n])
        for b, a in zip(batched, alone):
            torch.testing.assert_close(b[row:row + 1], a, atol=1e-5, rtol=0)
    heads = model.early_exit
    hidden = torch.randn(2, 5, heads.ics[0].fc.in_features)
    from leanformer.dynamic.early_exit import _Pass
    p = _Pass(collect=True, mask=torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]))
    expected = hidden[:, 0] if pooling == "cls" else torch.stack([hidden[0, :2].mean(0), hidden[1].mean(0)])
    torch.testing.assert_close(heads._pooled(hidden, p), expected)


def test_unknown_pooling_is_named_and_old_saves_read_the_first_token(make_tiny_bert, tmp_path):
    with pytest.raises(LeanformerError, match="unknown early-exit pooling 'max'; choose from mean, cls"):
        lf.EarlyExit(pooling="max")
    model = classifier(make_tiny_bert)
    lf.early_exit(model, lf.EarlyExit(kind="plain", pooling="cls"))
    lf.save(model, None, tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "leanformer.json").read_text())
    entry = next(t for t in meta["transforms"] if t["transform"] == "early_exit")
    del entry["config"]["pooling"]  # a directory saved before the field existed
    (tmp_path / "m" / "leanformer.json").write_text(json.dumps(meta))
    loaded, _ = lf.load(tmp_path / "m")
    assert loaded.early_exit.pooling == "cls"

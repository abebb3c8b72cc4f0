"""Early-exit points for benchmarks/dynamic_bench.py: Zero Time Waste and plain early exit on a fine-tuned
classifier, quality against cost at several exit thresholds, with measured CPU latency.

`early_exit_points(model_dir, task_dir, ...)` does, for each kind (ztw, plain) and seed:
  train   internal classifiers with the backbone frozen (leanformer.finetune(early_exit=...), the
          authors' learning rates 1e-3 for the heads, 1e-4 for ztw's ensembles), on the same fixed
          training sample the dense model was fine-tuned on (max_train_samples, drawn with seed 0)
  sweep   each τ: dev accuracy (per-example predictions and exit blocks kept), executed FLOPs and
          MLP FLOPs per token (fractions of dense, leanformer.dynamic.cost), layers executed, exits
          per layer
  time    each τ: forward latency at batch 1 and batch 32 over the same dev sentences, median of
          `repeats` runs, torch on `threads` threads; the dense model (no heads) timed on the same
          batches in the same run
  pick    τ* = the cheapest τ whose accuracy on held-out *training* examples (neither fine-tuning saw
          them) is within `max_loss` of the dense model's there; its dev numbers are reported as the
          operating point (dev is never used to choose)

The dense model's accuracy is the τ = 1 point (ICs not run: exactly the dense predictions).
Returns a dict with "points" (one row per kind, seed, τ), "dense", "picks"; `write_early_exit(result,
out_dir)` writes early_exit.json, early_exit.md and early_exit.png (accuracy against FLOPs per token,
mean over seeds, ztw and plain).

    nice -n 19 .venv/bin/python benchmarks/early_exit_points.py --smoke     # tiny random model, seconds
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

TAUS = (1.0, 0.99, 0.97, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.0)
KINDS = ("ztw", "plain")


def _batches(tokenizer, texts_a, texts_b, batch_size: int, max_length: int) -> list[dict]:
    out = []
    for i in range(0, len(texts_a), batch_size):
        b = None if texts_b is None else list(texts_b[i:i + batch_size])
        out.append(dict(tokenizer(list(texts_a[i:i + batch_size]), b, truncation=True, max_length=max_length,
                                  padding=True, return_tensors="pt")))
    return out


@torch.no_grad()
def latency_ms(model, batches: list[dict], repeats: int) -> float:
    """Median over `repeats` runs of the wall time of forwarding every batch, per example (ms)."""
    n = sum(len(b["input_ids"]) for b in batches)
    model(**batches[0])  # warm-up
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for b in batches:
            model(**b)
        runs.append((time.perf_counter() - start) * 1000 / n)
    return statistics.median(runs)


@torch.no_grad()
def predict_with_exits(model, tokenizer, split, batch_size: int, max_length: int):
    """Class ids of an early-exit model on `split` and the blocks each example ran (its exit)."""
    from leanformer.dynamic.early_exit import last_exits
    from leanformer.evaluation import predict

    exits: list[int] = []
    hook = model.register_forward_hook(lambda m, _a, _o: exits.extend(last_exits(m).tolist()))
    try:
        preds = predict(model, tokenizer, split.text_a, split.text_b, batch_size, max_length)
    finally:
        hook.remove()
    return preds, exits


def _held_out(task, max_train_samples: int | None, n: int):
    """Up to n training examples outside the fixed training sample (None when the sample is all of it)."""
    from leanformer.tasks import Split
    from leanformer.train.finetuning import train_indices

    used = set(train_indices(len(task.train), max_train_samples))
    rest = [i for i in range(len(task.train)) if i not in used][:n]
    if not rest:
        return None
    t = task.train
    return Split([t.text_a[i] for i in rest], None if t.text_b is None else [t.text_b[i] for i in rest],
                 [t.labels[i] for i in rest])


def early_exit_points(model_dir: str, task_dir: str, *, taus=TAUS, seeds=(0, 1, 2), kinds=KINDS,
                      max_train_samples: int | None = None, epochs: float = 2.0, batch_size: int = 32,
                      max_seq_length: int = 128, max_eval_samples: int | None = None, latency_examples: int = 256,
                      latency_examples_b1: int = 64, repeats: int = 5, threads: int = 1, held_out: int = 1000,
                      max_loss: float = 0.01, work_dir: str | None = None, progress=print) -> dict:
    import leanformer as lf
    from leanformer import dynamic
    from leanformer.dynamic.early_exit import HEADS_LEARNING_RATE
    from leanformer.evaluation import predict, task_metrics
    from leanformer.tasks import Split, load_task
    from transformers import TrainingArguments, set_seed

    torch.set_num_threads(threads)
    task = load_task(task_dir)
    dense, tok = lf.load(model_dir)
    dev = task.dev
    if max_eval_samples:
        dev = Split(dev.text_a[:max_eval_samples], None if dev.text_b is None else dev.text_b[:max_eval_samples],
                    dev.labels[:max_eval_samples])
    holdout = _held_out(task, max_train_samples, held_out)
    n_lat = min(latency_examples, len(dev))
    dev_b = dev.text_b
    lat_batches = {32: _batches(tok, dev.text_a[:n_lat], None if dev_b is None else dev_b[:n_lat], 32, max_seq_length),
                   1: _batches(tok, dev.text_a[:latency_examples_b1],
                               None if dev_b is None else dev_b[:latency_examples_b1], 1, max_seq_length)}
    dense_preds = predict(dense, tok, dev.text_a, dev.text_b, batch_size, max_seq_length)
    dense_row = {**task_metrics(dense_preds, dev.labels, task.metrics), "predictions": dense_preds.tolist(),
                 "latency_b1_ms": latency_ms(dense, lat_batches[1], repeats),
                 "latency_b32_ms": latency_ms(dense, lat_batches[32], repeats)}
    dense_held = None
    if holdout is not None:
        held_preds = predict(dense, tok, holdout.text_a, holdout.text_b, batch_size, max_seq_length)
        dense_held = float((held_preds == np.asarray(holdout.labels)).mean())
    progress(f"dense: accuracy {dense_row['accuracy']:.4f}, {dense_row['latency_b1_ms']:.2f} / "
             f"{dense_row['latency_b32_ms']:.2f} ms/ex at b1 / b32")
    points, picks = [], []
    work = Path(work_dir or tempfile.mkdtemp(prefix="early_exit_points_"))
    for kind in kinds:
        for seed in seeds:
            set_seed(seed)
            model = copy.deepcopy(dense)
            args = TrainingArguments(output_dir=str(work / f"{kind}_{seed}"), learning_rate=HEADS_LEARNING_RATE,
                                     num_train_epochs=epochs, per_device_train_batch_size=batch_size, seed=seed,
                                     save_strategy="no", report_to="none", logging_steps=10, disable_tqdm=True,
                                     use_cpu=True, warmup_steps=0.06, lr_scheduler_type="linear",
                                     train_sampling_strategy="group_by_length")
            started = time.perf_counter()
            trained = lf.finetune(model, tok, task, args, early_exit=lf.EarlyExit(kind=kind), evaluate=False,
                                  max_seq_length=max_seq_length, max_train_samples=max_train_samples)
            train_seconds = time.perf_counter() - started
            rows = []
            for tau in taus:
                dynamic.set_tau(model, tau)
                dynamic.reset_cost(model)
                preds, exits = predict_with_exits(model, tok, dev, batch_size, max_seq_length)
                row = {"tau": tau, **task_metrics(preds, dev.labels, task.metrics), **dynamic.cost(model),
                       "kind": kind, "seed": seed, "exit_accuracy": trained["early_exit"]["exit_accuracy"],
                       "train_seconds": train_seconds, "latency_b1_ms": latency_ms(model, lat_batches[1], repeats),
                       "latency_b32_ms": latency_ms(model, lat_batches[32], repeats),
                       "predictions": preds.tolist(), "exit_blocks": exits}
                if holdout is not None:
                    held_preds, _ = predict_with_exits(model, tok, holdout, batch_size, max_seq_length)
                    row["heldout_accuracy"] = float((held_preds == np.asarray(holdout.labels)).mean())
                rows.append(row)
                progress(f"{kind} seed {seed} τ {tau:g}: accuracy {row['accuracy']:.4f} flops "
                         f"{row['flops_per_token']:.3f} layers {row['layers_executed']:.3f} b1 "
                         f"{row['latency_b1_ms']:.2f} ms b32 {row['latency_b32_ms']:.2f} ms")
            points += rows
            if dense_held is not None:
                ok = [r for r in rows if r["heldout_accuracy"] >= dense_held - max_loss]
                best = min(ok, key=lambda r: r["flops_per_token"])
                picks.append({"kind": kind, "seed": seed, "tau": best["tau"], "heldout_accuracy": best["heldout_accuracy"],
                              "dense_heldout_accuracy": dense_held, "dev_accuracy": best["accuracy"],
                              "dense_dev_accuracy": dense_row["accuracy"], "flops_per_token": best["flops_per_token"],
                              "layers_executed": best["layers_executed"], "latency_b1_ms": best["latency_b1_ms"],
                              "latency_b32_ms": best["latency_b32_ms"]})
    return {"model": str(model_dir), "task": task.name, "taus": list(taus), "seeds": list(seeds), "epochs": epochs,
            "max_train_samples": max_train_samples, "held_out_examples": len(holdout) if holdout else 0,
            "max_loss": max_loss, "threads": threads, "repeats": repeats, "latency_examples": n_lat,
            "latency_examples_b1": min(latency_examples_b1, len(task.dev)), "dense": dense_row, "points": points,
            "picks": picks}


def _mean_curve(points: list[dict], kind: str, key: str) -> list[tuple[float, float, float]]:
    taus = sorted({p["tau"] for p in points if p["kind"] == kind})
    out = []
    for t in taus:
        rows = [p for p in points if p["kind"] == kind and p["tau"] == t]
        out.append((statistics.mean(r["flops_per_token"] for r in rows), statistics.mean(r[key] for r in rows), t))
    return out


def write_early_exit(result: dict, out_dir: Path, provenance: dict | None = None) -> list[Path]:
    """early_exit.json (every point, provenance), early_exit.md (mean over seeds per kind and τ; the
    picked operating points) and early_exit.png (accuracy against FLOPs per token)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {**result, **({"provenance": provenance} if provenance else {})}
    (out_dir / "early_exit.json").write_text(json.dumps(payload, indent=1, default=str), encoding="utf-8")
    d = result["dense"]
    lines = [f"Early exit on {result['task']} ({result['model']}), mean over seeds {result['seeds']}; dense: accuracy "
             f"{d['accuracy']:.4f}, {d['latency_b1_ms']:.2f} ms/example at batch 1, {d['latency_b32_ms']:.2f} at batch 32",
             "", "| kind | τ | accuracy | FLOPs/token | MLP FLOPs/token | layers executed | ms/ex b1 | ms/ex b32 |",
             "|---|---|---|---|---|---|---|---|"]
    for kind in sorted({p["kind"] for p in result["points"]}):
        for t in sorted({p["tau"] for p in result["points"] if p["kind"] == kind}, reverse=True):
            rows = [p for p in result["points"] if p["kind"] == kind and p["tau"] == t]
            m = {k: statistics.mean(r[k] for r in rows) for k in ("accuracy", "flops_per_token", "mlp_flops_per_token",
                                                                  "layers_executed", "latency_b1_ms", "latency_b32_ms")}
            lines.append(f"| {kind} | {t:g} | {m['accuracy']:.4f} | {m['flops_per_token']:.3f} | "
                         f"{m['mlp_flops_per_token']:.3f} | {m['layers_executed']:.3f} | {m['latency_b1_ms']:.2f} | "
                         f"{m['latency_b32_ms']:.2f} |")
    if result["picks"]:
        lines += ["", f"Operating points: τ picked on {result['held_out_examples']} held-out training examples (cheapest "
                      f"within {result['max_loss']:.0%} of dense there); dev numbers at that τ.", "",
                  "| kind | seed | τ | dev accuracy | dense dev | FLOPs/token | layers executed | ms/ex b1 | ms/ex b32 |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for p in result["picks"]:
            lines.append(f"| {p['kind']} | {p['seed']} | {p['tau']:g} | {p['dev_accuracy']:.4f} | "
                         f"{p['dense_dev_accuracy']:.4f} | {p['flops_per_token']:.3f} | {p['layers_executed']:.3f} | "
                         f"{p['latency_b1_ms']:.2f} | {p['latency_b32_ms']:.2f} |")
    (out_dir / "early_exit.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for kind, marker in (("ztw", "o"), ("plain", "s")):
        curve = _mean_curve(result["points"], kind, "accuracy")
        if curve:
            ax.plot([c[0] for c in curve], [c[1] for c in curve], marker=marker, label=kind)
            for x, y, t in curve:
                ax.annotate(f"{t:g}", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
    ax.axhline(d["accuracy"], color="grey", ls="--", lw=1, label="dense")
    ax.set_xlabel("executed FLOPs per token (fraction of dense)")
    ax.set_ylabel("dev accuracy (mean over seeds)")
    ax.set_title(f"early exit on {result['task']} (labels: τ)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "early_exit.png")
    plt.close(fig)
    return [out_dir / "early_exit.json", out_dir / "early_exit.md", out_dir / "early_exit.png"]


def _smoke(out: Path) -> None:
    """A 3-block random BERT over minilm's tokenizer on a toy task: every step runs, in seconds."""
    import random

    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    import leanformer as lf
    from leanformer.models import alias_path

    tok = AutoTokenizer.from_pretrained(str(alias_path("minilm")))
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                                     intermediate_size=64, vocab_size=tok.vocab_size))
    lf.save(model, tok, out / "dense")
    r = random.Random(0)
    words = (["bad", "awful", "poor"], ["good", "great", "fine"])
    for name, n in (("train", 160), ("dev", 32)):
        ys = [r.randint(0, 1) for _ in range(n)]
        rows = ["sentence,label"] + [" ".join(r.choice(words[y]) for _ in range(4)) + f",{y}" for y in ys]
        (out / f"{name}.csv").write_text("\n".join(rows) + "\n")
    result = early_exit_points(str(out / "dense"), f"{out / 'train.csv'},{out / 'dev.csv'}", taus=(1.0, 0.7, 0.0),
                               seeds=(0,), max_train_samples=96, epochs=1, max_seq_length=16, latency_examples=32,
                               latency_examples_b1=4, repeats=2, held_out=64, work_dir=str(out / "work"))
    for path in write_early_exit(result, out / "result"):
        print("wrote", path)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny random model and toy task (seconds)")
    parser.add_argument("--model", help="a fine-tuned classifier directory")
    parser.add_argument("--task", help="its task (GLUE directory)")
    parser.add_argument("--max-train-samples", type=int, default=None)
    parser.add_argument("--out", default=None)
    a = parser.parse_args()
    if a.smoke:
        _smoke(Path(tempfile.mkdtemp(prefix="early_exit_smoke_")))
    else:
        if not (a.model and a.task and a.out):
            parser.error("give --smoke, or --model, --task and --out")
        import sys

        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from provenance import git_state

        write_early_exit(early_exit_points(a.model, a.task, max_train_samples=a.max_train_samples), Path(a.out),
                         git_state())

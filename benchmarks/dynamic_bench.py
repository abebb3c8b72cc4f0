"""Dynamic inference on the CPU, in one run: the dense model against D2DMoE / DSTI (dynamic-k experts),
static top-k MoEfication and early exit (Zero Time Waste and plain), each point with its dev metric,
executed FLOPs per token (all and MLP, fractions of the dense model) and measured latency.

Protocol (issue 10)
  GLUE      minilm fully fine-tuned (BERT recipe: lr 5e-5, 10 % warm-up, weight decay 0.01, batch 32) on a
            fixed sample of the training split (drawn with seed 0), for SST-2 and MRPC: the dense model.
  DSTI      the sparsity phase from the dense model: GELU → ReLU and square-Hoyer on the MLP activations
            (w 1e-3, warmed up over half the run; Piórczyński et al. 2024, §3.1), same sample; then
            `lf.moefy` with 64 experts of 24 neurons (BERT-base's 128 × 24 in the paper: the same expert
            size on minilm's 1 536), routers trained on training-split tokens; rule dynk_max at every τ
            of --taus. The sparsified model at τ = 1 (every expert) is reported as dense-relu.
  top-k     the same experts and routers with a static k per token (MoEfication, Zhang et al. 2022), k
            = each DSTI point's mean executed experts per token, rounded: matched expert counts.
  early     ZTW and plain early exit on the dense model (benchmarks/early_exit_points.py, three seeds).
  stories   stories260K (gated SiLU MLP, 172 neurons: 16 experts of 10–11) moefied directly (no
            sparsity phase: that needs LM training), perplexity on held-out TinyStories paragraphs,
            calibration on the other paragraphs.
Each point: the dev metric with a 95 % bootstrap interval from its per-example predictions (kept in
predictions.json), MLP and total FLOPs per token (leanformer.dynamic.cost, counted as
leanformer/dynamic/flops.py), latency in ms per example at batch 1 and batch 32 over the same dev
examples (median of --repeats runs, torch and OMP/MKL/OpenBLAS on one thread, same batches for every
model), and the MLP share of it (wall time inside the MLP modules, timed with hooks in separate runs).
Operating points are picked on held-out *training* examples (the cheapest τ within --max-loss of the
dense model there), never on dev; their dev numbers are reported.

    flock /tmp/leanformer-bench.lock .venv/bin/python benchmarks/dynamic_bench.py            # → results/dynamic/
    nice -n 19 .venv/bin/python benchmarks/dynamic_bench.py --smoke                        # tiny models, < 1 min
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"  # before torch loads: every model runs on one thread

import argparse
import copy
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from early_exit_points import _batches, _held_out, early_exit_points, latency_ms, write_early_exit  # noqa: E402
from provenance import git_state  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "results" / "dynamic"
TAUS = (1.0, 0.99, 0.97, 0.95, 0.9, 0.8, 0.6, 0.4)
EARLY_EXIT_TAUS = (1.0, 0.99, 0.97, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.0)
TASKS = ("SST-2", "MRPC")
BOOTSTRAP = 1000


# ---------------------------------------------------------------------------------------------
# Measurements


@torch.no_grad()
def mlp_latency_ms(model, batches: list[dict], repeats: int, names: list[str]) -> float:
    """Median over runs of the time inside the MLP modules, per example (ms)."""
    from leanformer.dynamic.sweep import forward_timer

    n = sum(len(b["input_ids"]) for b in batches)
    model(**batches[0])
    runs = []
    for _ in range(repeats):
        with forward_timer(*(model.get_submodule(n) for n in names)) as clock:
            for b in batches:
                model(**b)
        runs.append(clock["seconds"] * 1000 / n)
    return statistics.median(runs)


def bootstrap_interval(correct: np.ndarray, seed: int = 0) -> list[float]:
    rng = np.random.default_rng(seed)
    means = correct[rng.integers(0, len(correct), size=(BOOTSTRAP, len(correct)))].mean(1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def classify_point(model, tok, task, split, settings, batches, names, dynamic_model: bool) -> dict:
    """Dev metric (+ interval, predictions), executed FLOPs, latency at batch 1 / 32 and their MLP part."""
    from leanformer import dynamic
    from leanformer.evaluation import predict, task_metrics

    if dynamic_model:
        dynamic.reset_cost(model)
    preds = predict(model, tok, split.text_a, split.text_b, settings["eval_batch_size"], settings["max_seq_length"])
    cost = dynamic.cost(model) if dynamic_model else {"mlp_flops_per_token": 1.0, "flops_per_token": 1.0}
    labels = np.asarray(split.labels)
    row = {**task_metrics(preds, labels, task.metrics), **cost,
           "accuracy_interval": bootstrap_interval((preds == labels).astype(float)), "predictions": preds.tolist()}
    if batches is not None:
        for size in (1, 32):
            row[f"latency_b{size}_ms"] = latency_ms(model, batches[size], settings["repeats"])
            row[f"mlp_latency_b{size}_ms"] = mlp_latency_ms(model, batches[size], settings["repeats"], names)
    return row


def heldout_accuracy(model, tok, split, settings) -> float:
    from leanformer.evaluation import predict

    preds = predict(model, tok, split.text_a, split.text_b, settings["eval_batch_size"], settings["max_seq_length"])
    return float((preds == np.asarray(split.labels)).mean())


def mlp_names(model) -> list[str]:
    """The modules that compute each block's MLP (the ones lf.moefy replaces), on the dense model."""
    from leanformer.dynamic.moe import find_mlps

    return [n for s in find_mlps(model) for n in (s.replace, s.passthrough) if n]


# ---------------------------------------------------------------------------------------------
# Training


def training_args(out: Path, settings: dict, epochs: float, seed: int = 0):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=str(out), learning_rate=settings["learning_rate"], num_train_epochs=epochs,
                             max_steps=settings.get("max_steps") or -1,
                             per_device_train_batch_size=settings["train_batch_size"], warmup_steps=0.1,
                             weight_decay=0.01, lr_scheduler_type="linear", seed=seed, save_strategy="no",
                             report_to="none", logging_steps=10, disable_tqdm=True, use_cpu=True,
                             train_sampling_strategy="group_by_length")


def fine_tune_dense(base: str, task, work: Path, settings: dict, progress) -> tuple[Path, dict]:
    import leanformer as lf
    from transformers import set_seed

    set_seed(0)
    model, tok = lf.load(base, head="sequence-classification", num_labels=task.num_labels)
    started = time.perf_counter()
    m = lf.finetune(model, tok, task, training_args(work / "ck-dense", settings, settings["epochs"]), method="full",
                    max_seq_length=settings["max_seq_length"], max_train_samples=settings["max_train_samples"],
                    evaluate=False)
    lf.save(model, tok, work / "dense")
    progress(f"{task.name}: dense fine-tune {time.perf_counter() - started:.0f} s, train loss {m['train_loss']:.4f}")
    return work / "dense", {k: m[k] for k in ("train_steps", "train_loss", "train_samples")}


def sparsify(dense_dir: Path, task, work: Path, settings: dict, progress) -> tuple[Path, dict]:
    """D2DMoE's sparsity phase from the dense fine-tuned model: ReLU + square-Hoyer, then saved."""
    import leanformer as lf
    from leanformer.train.regularizers import ActivationSparsity
    from transformers import set_seed

    set_seed(0)
    model, tok = lf.load(dense_dir)
    started = time.perf_counter()
    m = lf.finetune(model, tok, task, training_args(work / "ck-sparse", settings, settings["sparsity_epochs"]),
                    method="full", max_seq_length=settings["max_seq_length"],
                    max_train_samples=settings["max_train_samples"], evaluate=False, relu_mlp=True,
                    sparsity_reg=ActivationSparsity("hoyer", settings["sparsity_weight"], 0.5))
    lf.save(model, tok, work / "sparse")
    progress(f"{task.name}: sparsity phase {time.perf_counter() - started:.0f} s, Hoyer {m['sparsity_reg']:.1f}, "
             f"zero MLP activations {m['mlp_zero_fraction']:.3f}")
    return work / "sparse", {k: m[k] for k in ("train_steps", "train_loss", "sparsity_reg", "mlp_zero_fraction")}


# ---------------------------------------------------------------------------------------------
# One GLUE task


def run_glue(base: str, task_dir: str, work: Path, settings: dict, progress) -> dict:
    import leanformer as lf
    from leanformer import dynamic
    from leanformer.dynamic.moe import moe_layers, set_rule, set_top_k
    from leanformer.tasks import load_task

    torch.set_num_threads(1)
    task = load_task(task_dir)
    dev = task.dev
    if settings.get("max_eval_samples"):
        n = settings["max_eval_samples"]
        dev = type(dev)(dev.text_a[:n], None if dev.text_b is None else dev.text_b[:n], dev.labels[:n])
    # training examples held out for picking operating points: up to settings["held_out"], at most a fifth
    # of the split; the training sample shrinks where the split is too small for both (MRPC)
    n_train = len(task.train)
    held = min(settings["held_out"], n_train // 5)
    settings = {**settings, "held_out": held,
                "max_train_samples": min(settings["max_train_samples"] or n_train, n_train - held)}
    holdout = _held_out(task, settings["max_train_samples"], held)
    dense_dir, dense_train = fine_tune_dense(base, task, work, settings, progress)
    dense, tok = lf.load(dense_dir)
    n_lat = min(settings["latency_examples"], len(dev))
    batches = {32: _batches(tok, dev.text_a[:n_lat], None if dev.text_b is None else dev.text_b[:n_lat], 32,
                            settings["max_seq_length"]),
               1: _batches(tok, dev.text_a[:settings["latency_examples_b1"]],
                           None if dev.text_b is None else dev.text_b[:settings["latency_examples_b1"]], 1,
                           settings["max_seq_length"])}
    names = mlp_names(dense)
    rows = [{"method": "dense", "tau": None, **classify_point(dense, tok, task, dev, settings, batches, names, False),
             "heldout_accuracy": heldout_accuracy(dense, tok, holdout, settings) if holdout else None}]
    progress(f"{task.name} dense: {_brief(rows[-1])}")

    sparse_dir, sparse_train = sparsify(dense_dir, task, work, settings, progress)
    model, tok = lf.load(sparse_dir)
    rows.append({"method": "dense-relu", "tau": None,
                 **classify_point(model, tok, task, dev, settings, batches, names, False),
                 "heldout_accuracy": heldout_accuracy(model, tok, holdout, settings) if holdout else None})
    progress(f"{task.name} dense-relu: {_brief(rows[-1])}")
    started = time.perf_counter()
    report = lf.moefy(model, lf.DSTI(experts=settings["experts"], tokens=settings["calibration_tokens"],
                                     max_seq_length=settings["max_seq_length"]), tokenizer=tok, calibration=task)
    moefy_seconds = time.perf_counter() - started
    for tau in settings["taus"]:
        set_rule(model, "dynk_max")
        dynamic.set_tau(model, tau)
        row = {"method": "dsti", "tau": tau, **classify_point(model, tok, task, dev, settings, batches, names, True)}
        row["heldout_accuracy"] = heldout_accuracy(model, tok, holdout, settings) if holdout else None
        rows.append(row)
        progress(f"{task.name} dsti τ {tau:g}: {_brief(row)}")
    experts = moe_layers(model)[0].experts
    for k in sorted({max(1, min(experts, round(r["experts_per_token"]))) for r in rows if r["method"] == "dsti"}):
        set_top_k(model, k)
        row = {"method": "topk", "tau": None, "k": k,
               **classify_point(model, tok, task, dev, settings, batches, names, True)}
        row["heldout_accuracy"] = heldout_accuracy(model, tok, holdout, settings) if holdout else None
        rows.append(row)
        progress(f"{task.name} top-{k}: {_brief(row)}")
    early = early_exit_points(str(dense_dir), task_dir, taus=settings["early_exit_taus"], seeds=settings["seeds"],
                              max_train_samples=settings["max_train_samples"], epochs=settings["early_exit_epochs"],
                              max_seq_length=settings["max_seq_length"],
                              max_eval_samples=settings.get("max_eval_samples"),
                              latency_examples=settings["latency_examples"],
                              latency_examples_b1=settings["latency_examples_b1"], repeats=settings["repeats"],
                              held_out=settings["held_out"], max_loss=settings["max_loss"],
                              work_dir=str(work / "early_exit"), progress=progress)
    return {"task": task.name, "metric": task.metrics[0], "dev_examples": len(dev), "rows": rows,
            "train_samples": settings["max_train_samples"], "held_out_examples": held,
            "dense_training": dense_train, "sparsity_training": sparse_train,
            "moefy": {**report, "seconds": moefy_seconds}, "early_exit": early,
            "picks": _picks(rows, settings["max_loss"])}


def _brief(row: dict) -> str:
    lat = (f", {row['latency_b1_ms']:.2f} / {row['latency_b32_ms']:.2f} ms/ex (MLP {row['mlp_latency_b1_ms']:.2f} / "
           f"{row['mlp_latency_b32_ms']:.2f}) at b1 / b32" if "latency_b1_ms" in row else "")
    quality = f"ppl {row['perplexity']:.3f}" if "perplexity" in row else f"accuracy {row['accuracy']:.4f}"
    return f"{quality}, MLP FLOPs {row['mlp_flops_per_token']:.3f}, FLOPs {row['flops_per_token']:.3f}{lat}"


def _picks(rows: list[dict], max_loss: float) -> list[dict]:
    """Per method, the cheapest point whose held-out training accuracy is within max_loss of dense's."""
    dense = next(r for r in rows if r["method"] == "dense")
    if dense.get("heldout_accuracy") is None:
        return []
    out = []
    for method in ("dsti", "topk"):
        ok = [r for r in rows
              if r["method"] == method and r["heldout_accuracy"] >= dense["heldout_accuracy"] - max_loss]
        if ok:
            best = min(ok, key=lambda r: r["mlp_flops_per_token"])
            out.append({k: v for k, v in best.items() if k != "predictions"})
    return out


# ---------------------------------------------------------------------------------------------
# stories260K: the decoder (gated MLP) path


def paragraphs(path: Path) -> list[str]:
    return [p.strip() for p in re.split(r"\n\s*\n", path.read_text(encoding="utf-8")) if p.strip()]


def run_stories(base: str, text_path: Path, settings: dict, progress) -> dict:
    import leanformer as lf
    from leanformer import dynamic
    from leanformer.dynamic.moe import moe_layers, set_rule, set_top_k

    torch.set_num_threads(1)
    model, tok = lf.load(base)
    paras = paragraphs(text_path)
    cut = len(paras) // 2  # calibration from the first half, evaluation on the second: disjoint text
    calibration = ["\n".join(paras[i:i + 8]) for i in range(0, cut, 8)]
    ids = tok("\n".join(paras[cut:]))["input_ids"][:settings["stories_eval_tokens"]]
    held = tok.decode(ids, skip_special_tokens=True)
    length = settings["stories_seq_length"]
    windows = [ids[i:i + length] for i in range(0, len(ids) - length + 1, length)]
    batches = {1: [{"input_ids": torch.tensor([w])} for w in windows[:settings["latency_examples_b1"]]],
               32: [{"input_ids": torch.tensor(windows[i:i + 32])} for i in range(0, min(len(windows), 64), 32)]}
    names = mlp_names(model)

    def point(m, dynamic_model: bool) -> dict:
        if dynamic_model:
            dynamic.reset_cost(m)
        row = lf.perplexity(m, tok, [held], max_length=length, stride=length)
        row.update(dynamic.cost(m) if dynamic_model else {"mlp_flops_per_token": 1.0, "flops_per_token": 1.0})
        for size in (1, 32):
            row[f"latency_b{size}_ms"] = latency_ms(m, batches[size], settings["repeats"])
            row[f"mlp_latency_b{size}_ms"] = mlp_latency_ms(m, batches[size], settings["repeats"], names)
        return row

    rows = [{"method": "dense", "tau": None, **point(model, False)}]
    progress(f"stories dense: {_brief(rows[-1])}")
    report = lf.moefy(model, lf.DSTI(experts=settings["stories_experts"], tokens=settings["calibration_tokens"],
                                     max_seq_length=length), tokenizer=tok, calibration=calibration)
    for tau in settings["taus"]:
        set_rule(model, "dynk_max")
        dynamic.set_tau(model, tau)
        rows.append({"method": "dsti", "tau": tau, **point(model, True)})
        progress(f"stories dsti τ {tau:g}: {_brief(rows[-1])}")
    experts = moe_layers(model)[0].experts
    for k in sorted({max(1, min(experts, round(r["experts_per_token"]))) for r in rows if r["method"] == "dsti"}):
        set_top_k(model, k)
        rows.append({"method": "topk", "tau": None, "k": k, **point(model, True)})
        progress(f"stories top-{k}: {_brief(rows[-1])}")
    return {"task": "stories260K", "metric": "perplexity", "eval_tokens": len(ids), "rows": rows, "moefy": report}


# ---------------------------------------------------------------------------------------------
# Writing


def _area(points: list[dict], kind: str) -> float | None:
    """Mean accuracy of `kind`'s seed-averaged accuracy/FLOPs curve over the FLOPs range every kind's curve
    covers (trapezoids; the curves are interpolated linearly), or None without points."""
    def curve(k):
        by_tau: dict = {}
        for p in points:
            if p["kind"] == k:
                by_tau.setdefault(p["tau"], []).append((p["flops_per_token"], p["accuracy"]))
        return sorted((statistics.mean(a for a, _ in v), statistics.mean(b for _, b in v)) for v in by_tau.values())

    curves = {k: curve(k) for k in {p["kind"] for p in points}}
    if not curves.get(kind) or any(len(c) < 2 for c in curves.values()):
        return None
    low = max(c[0][0] for c in curves.values())
    high = min(c[-1][0] for c in curves.values())
    if high <= low:
        return None
    grid = np.linspace(low, high, 200)
    xs, ys = zip(*curves[kind])
    return float(np.interp(grid, xs, ys).mean())


def write_results(result: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = []
    predictions = {t["task"]: [{"method": r["method"], "tau": r["tau"], "k": r.get("k"),
                                "predictions": r["predictions"]} for r in t["rows"] if "predictions" in r]
                   for t in result["glue"]}
    (out / "predictions.json").write_text(json.dumps(predictions), encoding="utf-8")
    slim = copy.deepcopy(result)
    for t in slim["glue"]:
        for r in t["rows"]:
            r.pop("predictions", None)
    (out / "results.json").write_text(json.dumps(slim, indent=1, default=str), encoding="utf-8")
    written += [out / "predictions.json", out / "results.json"]
    lines = [f"# Dynamic inference on CPU (commit {result['provenance']['commit'][:12]}"
             f"{', uncommitted changes' if result['provenance']['dirty'] else ''})", "",
             f"Settings: {json.dumps({k: v for k, v in result['settings'].items() if k != 'taus'})}; τ grid "
             f"{result['settings']['taus']}. Latency: ms per example, median of {result['settings']['repeats']} runs, "
             "one thread; MLP: the part of it inside the MLP modules.", ""]
    for t in result["glue"] + ([result["stories"]] if result.get("stories") else []):
        metric = t["metric"]
        lines += [f"## {t['task']}", "", f"| method | τ / k | {metric} | 95 % interval | MLP FLOPs | FLOPs | "
                  "experts/token | ms b1 | MLP ms b1 | ms b32 | MLP ms b32 |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in t["rows"]:
            knob = f"k={r['k']}" if r.get("k") else ("" if r["tau"] is None else f"{r['tau']:g}")
            interval = "–".join(f"{v:.4f}" for v in r["accuracy_interval"]) if "accuracy_interval" in r else ""
            ept = f"{r['experts_per_token']:.2f}" if r.get("experts_per_token") is not None else ""
            lines.append(f"| {r['method']} | {knob} | {r[metric]:.4f} | {interval} | {r['mlp_flops_per_token']:.3f} | "
                         f"{r['flops_per_token']:.3f} | {ept} | {r['latency_b1_ms']:.2f} | "
                         f"{r['mlp_latency_b1_ms']:.2f} | {r['latency_b32_ms']:.2f} | {r['mlp_latency_b32_ms']:.2f} |")
        lines.append("")
        if t.get("picks"):
            dense = next(r for r in t["rows"] if r["method"] == "dense")
            lines += [f"Operating points (τ / k picked on held-out training examples, cheapest within "
                      f"{result['settings']['max_loss']:.0%} of dense there; dev numbers):", ""]
            for p in t["picks"]:
                loss = 100 * (dense[metric] - p[metric])
                mlp_speed_b32 = dense["mlp_latency_b32_ms"] / p["mlp_latency_b32_ms"]
                mlp_speed_b1 = dense["mlp_latency_b1_ms"] / p["mlp_latency_b1_ms"]
                target = p["mlp_flops_per_token"] <= 0.5 and loss <= 1.0 and mlp_speed_b32 >= 1.3
                knob = f"τ {p['tau']:g}" if p["tau"] is not None else f"k {p['k']}"
                verdict = (f" — target (≥50 % fewer MLP FLOPs, ≤1 point, ≥1.3× MLP speed-up at b32) "
                           f"{'met' if target else 'not met'}") if p["method"] == "dsti" else ""
                lines.append(f"- {p['method']} {knob}: {metric} {p[metric]:.4f} ({loss:+.2f} points below dense), "
                             f"MLP FLOPs {p['mlp_flops_per_token']:.3f}, MLP speed-up {mlp_speed_b1:.2f}× (b1) / "
                             f"{mlp_speed_b32:.2f}× (b32){verdict}")
            lines.append("")
        if "early_exit" in t:
            lines += [f"Early exit (every point, per seed: {t['task']}/early_exit.md):", ""]
            for kind in ("ztw", "plain"):
                picks = [p for p in t["early_exit"]["picks"] if p["kind"] == kind]
                if picks:
                    loss = statistics.mean(100 * (p["dense_dev_accuracy"] - p["dev_accuracy"]) for p in picks)
                    layers = statistics.mean(p["layers_executed"] for p in picks)
                    lines.append(f"- {kind}: at the τ picked on held-out training examples, {loss:+.2f} points below "
                                 f"dense on dev, {100 * (1 - layers):.1f} % fewer layers executed, FLOPs "
                                 f"{statistics.mean(p['flops_per_token'] for p in picks):.3f} (mean of "
                                 f"{len(picks)} seeds)")
            auc = {kind: _area(t["early_exit"]["points"], kind) for kind in ("ztw", "plain")}
            if all(v is not None for v in auc.values()):
                above = "yes" if auc["ztw"] > auc["plain"] else "no"
                lines.append(f"- accuracy averaged over the FLOPs range both curves cover: ztw {auc['ztw']:.4f}, "
                             f"plain {auc['plain']:.4f} (ZTW above plain: {above})")
            lines.append("")
        fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
        for method, marker in (("dsti", "o"), ("topk", "s")):
            pts = sorted((r["flops_per_token"], r[metric]) for r in t["rows"] if r["method"] == method)
            if pts:
                ax.plot(*zip(*pts), marker=marker, label=method)
        if "early_exit" in t:
            for kind, marker in (("ztw", "^"), ("plain", "v")):
                by_tau: dict = {}
                for p in t["early_exit"]["points"]:
                    if p["kind"] == kind:
                        by_tau.setdefault(p["tau"], []).append((p["flops_per_token"], p["accuracy"]))
                pts = sorted((statistics.mean(a for a, _ in v), statistics.mean(b for _, b in v))
                             for v in by_tau.values())
                if pts:
                    ax.plot(*zip(*pts), marker=marker, label=f"{kind} early exit")
        for r in t["rows"]:
            if r["method"] in ("dense", "dense-relu"):
                ax.scatter([r["flops_per_token"]], [r[metric]], marker="*", s=90, label=r["method"], zorder=3)
        ax.set_xlabel("executed FLOPs per token (fraction of dense)")
        ax.set_ylabel(f"dev {metric}" + (" (lower is better)" if metric == "perplexity" else ""))
        ax.set_title(f"{t['task']}: quality vs cost")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        png = out / f"{t['task']}_quality_vs_flops.png"
        fig.savefig(png)
        plt.close(fig)
        written.append(png)
        if "early_exit" in t:
            written += write_early_exit(t["early_exit"], out / t["task"], result["provenance"])
    (out / "results.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    written.append(out / "results.md")
    return written


# ---------------------------------------------------------------------------------------------
# Entry points


FULL = dict(taus=list(TAUS), early_exit_taus=list(EARLY_EXIT_TAUS), seeds=[0, 1, 2], max_train_samples=8000,
            epochs=2.0, sparsity_epochs=1.0, early_exit_epochs=2.0, learning_rate=5e-5, train_batch_size=32,
            eval_batch_size=64, max_seq_length=128, sparsity_weight=1e-3, experts=64, stories_experts=16,
            calibration_tokens=16384, latency_examples=256, latency_examples_b1=64, repeats=5, held_out=1000,
            max_loss=0.01, stories_eval_tokens=16384, stories_seq_length=256, max_eval_samples=None)


def main_full(args) -> None:
    from leanformer.paths import data_root

    root = data_root()
    if root is None:
        sys.exit("the shared data (../shared/data or $LEANFORMER_DATA) is not present")
    settings = {**FULL, **{k: v for k, v in vars(args).items() if k in FULL and v is not None}}
    work = Path(tempfile.mkdtemp(prefix="dynamic_bench_"))
    glue = [run_glue("minilm", str(root / "glue" / name), work / name, settings, print) for name in args.tasks]
    stories = run_stories("stories260k", root / "text" / "tinystories.valid.txt", settings, print)
    result = {"provenance": git_state(), "settings": settings, "glue": glue, "stories": stories,
              "torch_threads": torch.get_num_threads()}
    for path in write_results(result, Path(args.out)):
        print("wrote", path)


def main_smoke(args) -> None:
    """Every step on tiny random models and toy data: a BERT classifier on two toy tasks, a Llama LM on
    toy text; a few dozen training steps; nothing written to results/."""
    import random

    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

    import leanformer as lf
    from leanformer.models import alias_path

    work = Path(tempfile.mkdtemp(prefix="dynamic_smoke_"))
    tok = AutoTokenizer.from_pretrained(str(alias_path("minilm")))
    torch.manual_seed(0)
    bert = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                                    intermediate_size=64, vocab_size=tok.vocab_size))
    lf.save(bert, tok, work / "tiny-bert")
    llama = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=68, num_attention_heads=4,
                                         num_key_value_heads=2, num_hidden_layers=2, vocab_size=tok.vocab_size,
                                         max_position_embeddings=128))
    lf.save(llama, tok, work / "tiny-llama")
    r = random.Random(0)
    words = (["bad", "awful", "poor", "sad"], ["good", "great", "fine", "nice"])
    tasks = []
    for t in ("a", "b"):
        for name, n in (("train", 192), ("dev", 32)):
            ys = [r.randint(0, 1) for _ in range(n)]
            rows = ["sentence,label"] + [" ".join(r.choice(words[y]) for _ in range(5)) + f",{y}" for y in ys]
            (work / f"{t}-{name}.csv").write_text("\n".join(rows) + "\n")
        tasks.append(f"{work / f'{t}-train.csv'},{work / f'{t}-dev.csv'}")
    story = "\n\n".join(" ".join(r.choice(words[0] + words[1] + ["the", "cat", "a", "dog"]) for _ in range(40))
                        for _ in range(40))
    (work / "stories.txt").write_text(story)
    settings = {**FULL, "taus": [1.0, 0.8, 0.5, 0.2, 0.0], "early_exit_taus": [1.0, 0.7, 0.0], "seeds": [0],
                "max_train_samples": 128, "epochs": 1.0, "sparsity_epochs": 1.0, "early_exit_epochs": 1.0,
                "learning_rate": 1e-3, "train_batch_size": 16, "max_seq_length": 16, "experts": 8,
                "stories_experts": 6, "calibration_tokens": 512, "latency_examples": 32, "latency_examples_b1": 4,
                "repeats": 2, "held_out": 64, "stories_eval_tokens": 1024, "stories_seq_length": 32}
    started = time.perf_counter()
    glue = [run_glue(str(work / "tiny-bert"), t, work / f"run{i}", settings, print) for i, t in enumerate(tasks)]
    stories = run_stories(str(work / "tiny-llama"), work / "stories.txt", settings, print)
    result = {"provenance": git_state(), "settings": settings, "glue": glue, "stories": stories,
              "torch_threads": torch.get_num_threads()}
    for path in write_results(result, work / "results"):
        print("wrote", path)
    print(f"smoke run: {time.perf_counter() - started:.0f} s; results in {work / 'results'}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny random models and toy data (under a minute)")
    parser.add_argument("--out", default=str(OUT), help="output directory (default: results/dynamic)")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), help="GLUE tasks under the shared data")
    for key, default in FULL.items():  # every setting can be overridden, as JSON (e.g. --taus '[1, 0.9]')
        parser.add_argument("--" + key.replace("_", "-"), dest=key, type=json.loads,
                            help=f"default: {json.dumps(default)}")
    a = parser.parse_args()
    main_smoke(a) if a.smoke else main_full(a)

"""Memory-efficient fine-tuning side by side: minilm on SST-2 and CoLA.

  * SparseGrad vs MeProp vs LoRA at an equal trainable-parameter budget: the MLP up- and
    down-projections of every block; LoRA rank 8 there (8·(in + out) = 15 360 parameters per layer),
    SparseGrad / MeProp updating k = 15 360 entries per layer per step (budget_rank 8);
  * full fine-tuning with and without randomized backprop (Gaussian sketch, ratios 0.5, 0.2, 0.1);
  * AdamW vs NAG-GS for full fine-tuning and for that LoRA (NAG-GS at the paper's GLUE defaults:
    α 5e-2, μ = γ = 1, constant schedule; no lr tuning).

Protocol and budget follow benchmarks/adapters_bench.py: a fixed random sample of the training split
(--train-samples, default 1 200 sentences: one epoch of 150 steps of 8, the adapters benchmark's
budget), max length 128, group-by-length batches, AdamW with linear decay and 6 % warm-up, the task
head at lr 1e-3 for adapter methods, full dev set, torch threads 1, one subprocess per run, two runs
at a time. SparseGrad's basis costs 10 extra warm-up batches.

Each run records the dev metric (SST-2 accuracy, CoLA MCC) with its per-example predictions, peak RSS
of its process, the bytes autograd saves for backward on one fixed training batch (32 sentences
padded to the max length; torch.autograd.graph.saved_tensors_hooks, all activations and the part saved
by Linear layers), the optimizer's state bytes at the end of training, and the median step time
(two runs share the 2 cores, so compare step times loosely).

    flock /tmp/leanformer-bench.lock .venv/bin/python benchmarks/memory_bench.py   # → results/memory/
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from child_runs import ChildFailed, run_child
from provenance import commit_label

ROOT = Path(__file__).resolve().parents[1]

# minilm's MLP up / down projections only (a regex: the suffix "output.dense" would also take each
# block's attention.output.dense)
MLP_TARGETS = r".*\.layer\.\d+\.(intermediate|output)\.dense"
BUDGET_RANK = 8
# Learning rates, fixed before the run: full fine-tuning and LoRA at their recipes (leanformer.adapters.recipe,
# as adapters_bench); SparseGrad's chosen on a split of SST-2's *training* set (1 000 held-out training
# sentences, never dev; 150 steps of 8, seed 0; MLP and attention-output layers): 80.5 at 2e-4, 81.4 at
# 1e-3; MeProp, the same update without the rotation, takes the same rate. NAG-GS: the paper's α.
LR = {"full": 5e-5, "lora": 2e-3, "sparsegrad": 1e-3, "meprop": 1e-3, "naggs": 5e-2}
HEAD_LR = 1e-3
BASIS_STEPS = 10  # SparseGrad's gradient warm-up: the paper's 10–30 steps, the low end for this small budget
# name → (method, optimizer, randomized-backprop ratio)
RUNS = {
    "lora": ("lora", "adamw", None),
    "sparsegrad": ("sparsegrad", "adamw", None),
    "meprop": ("meprop", "adamw", None),
    "full": ("full", "adamw", None),
    "full_rb0.5": ("full", "adamw", 0.5),
    "full_rb0.2": ("full", "adamw", 0.2),
    "full_rb0.1": ("full", "adamw", 0.1),
    "full_naggs": ("full", "naggs", None),
    "lora_naggs": ("lora", "naggs", None),
}
TASKS = ("SST-2", "CoLA")
METRIC = {"SST-2": "accuracy", "CoLA": "mcc"}


def majority_scores(data: str, tasks: list[str]) -> dict[str, float]:
    """Each task's dev score (×100) of always predicting the most frequent training label."""
    from collections import Counter

    from leanformer.evaluation import task_metrics
    from leanformer.tasks import load_task

    out = {}
    for name in tasks:
        task = load_task(str(Path(data) / name))
        label = Counter(task.train.labels).most_common(1)[0][0]
        out[name] = 100 * task_metrics([label] * len(task.dev), task.dev.labels, task.metrics)[METRIC[name]]
    return out


def child(name: str, task_name: str, seed: int, args) -> dict:
    import tempfile

    import torch

    torch.set_num_threads(1)
    from transformers import DataCollatorWithPadding, TrainingArguments

    import leanformer as lf
    from leanformer.adapters.sparsegrad import touched_entries
    from leanformer.evaluation import predict, task_metrics
    from leanformer.tasks import load_task
    from leanformer.train.finetuning import encode_split, finetune
    from leanformer.train.randomized_backprop import (RandomizedBackprop, apply_randomized_backprop,
                                                      remove_randomized_backprop, saved_for_backward)

    method, optimizer, ratio = RUNS[name]
    task = load_task(str(Path(args.data) / task_name))
    torch.manual_seed(seed)  # the head's (and LoRA's) initialisation follows the seed
    model, tok = lf.load("minilm", head="sequence-classification", num_labels=task.num_labels)
    config = {"full": "full",
              "lora": lf.LoRA(rank=BUDGET_RANK, alpha=16, targets=MLP_TARGETS),
              "sparsegrad": lf.SparseGrad(budget_rank=BUDGET_RANK, targets=MLP_TARGETS, basis_steps=BASIS_STEPS),
              "meprop": lf.MeProp(budget_rank=BUDGET_RANK, targets=MLP_TARGETS)}[method]
    naggs = optimizer == "naggs"
    lr = LR["naggs"] if naggs else LR[method]
    with tempfile.TemporaryDirectory() as scratch:
        training = TrainingArguments(
            output_dir=scratch, learning_rate=lr, num_train_epochs=args.epochs,
            warmup_steps=0 if naggs else 0.06, lr_scheduler_type="constant" if naggs else "linear",
            per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=64, seed=seed, optim="adamw_torch",
            train_sampling_strategy="group_by_length", save_strategy="no", report_to="none", disable_tqdm=True,
            use_cpu=True)
        res = finetune(model, tok, task, training, method=config, max_seq_length=args.max_seq_length,
                       max_train_samples=args.train_samples, evaluate=False, optimizer=naggs and "naggs" or "adamw",
                       head_learning_rate=None if method == "full" or naggs else HEAD_LR,
                       randomized_backprop=RandomizedBackprop(ratio, "gaussian") if ratio else None)
    if not getattr(args, "memory_probe", False):  # dev predictions, kept per example
        model.eval()
        preds = predict(model, tok, task.dev.text_a, task.dev.text_b, 64, args.max_seq_length)
        res.update(task_metrics(preds, task.dev.labels, task.metrics))
        res["dev_predictions"] = [int(p) for p in preds]
    if method in ("sparsegrad", "meprop"):
        res["touched_entries"] = sum(touched_entries(model).values())
        res["entries_per_step"] = 12 * BUDGET_RANK * (384 + 1536)
    # the bytes saved for backward on one fixed batch, in the training configuration
    rows = encode_split(tok, task.train, list(range(32)), args.max_seq_length)
    collate = DataCollatorWithPadding(tok, padding="max_length", max_length=args.max_seq_length, return_tensors="pt")
    batch = collate(rows)
    model.train()
    if ratio:
        apply_randomized_backprop(model, RandomizedBackprop(ratio, "gaussian"))
    res["saved_for_backward"] = saved_for_backward(model, dict(batch))
    if ratio:
        remove_randomized_backprop(model)
    res.update(name=name, task=task_name, seed=seed, lr=lr, method=method, optimizer_name=optimizer, ratio=ratio)
    return res


# ---------------------------------------------------------------------------------------------
# Report


def summarize(runs: list[dict], args) -> tuple[dict, str]:
    import numpy as np

    rows = []
    for task in TASKS:
        for name in RUNS:
            rs = [r for r in runs if r["name"] == name and r["task"] == task]
            if not rs:
                continue
            metric = np.array([r[METRIC[task]] for r in rs]) * 100
            saved = [r["saved_for_backward"] for r in rs]
            rows.append({
                "task": task, "name": name, "metric": METRIC[task], "metric_mean": float(metric.mean()),
                "metric_std": float(metric.std(ddof=1)) if len(metric) > 1 else 0.0, "metric_runs": metric.tolist(),
                "seeds": [r["seed"] for r in rs], "lr": rs[0]["lr"], "trainable_params": rs[0]["trainable_params"],
                "entries_per_step": rs[0].get("entries_per_step"),
                "touched_entries": float(np.mean([r["touched_entries"] for r in rs])) if "touched_entries" in rs[0] else None,
                "peak_rss_mb": float(max(r["peak_rss_mb"] for r in rs)),
                "activation_mb": float(np.mean([s["activations"] for s in saved])) / 2 ** 20,
                "linear_activation_mb": float(np.mean([s["linear_inputs"] for s in saved])) / 2 ** 20,
                "optimizer_state_mb": float(np.mean([r["optimizer_state_bytes"] for r in rs])) / 2 ** 20,
                "step_s": float(np.median([r["train_seconds_per_step"] for r in rs])),
                "train_loss": float(np.mean([r["train_loss"] for r in rs])), "train_steps": rs[0]["train_steps"]})
    by = {(r["task"], r["name"]): r for r in rows}
    majority = majority_scores(args.data, sorted({r["task"] for r in rows}))

    def learned(task, name):
        # above always predicting the most frequent training label by more than one point and more than
        # twice its seed-to-seed sd: a comparison between runs that all sit at that baseline says
        # nothing about the methods
        r = by.get((task, name))
        return r is not None and r["metric_mean"] - majority[task] > max(1.0, 2 * r["metric_std"])

    targets = {}
    for task in TASKS:
        def gap(a, b):
            return by[(task, a)]["metric_mean"] - by[(task, b)]["metric_mean"] if (task, a) in by and (task, b) in by else None
        g = gap("sparsegrad", "lora")
        if g is not None:
            targets[f"{task}: SparseGrad ≥ LoRA at equal budget"] = {
                "sparsegrad_minus_lora_points": g, "meprop_minus_lora_points": gap("meprop", "lora"), "met": g >= 0,
                "judged": learned(task, "sparsegrad") or learned(task, "lora")}
        if (task, "full") in by:
            options = []
            for ratio in (0.5, 0.2, 0.1):
                key = (task, f"full_rb{ratio}")
                if key in by:
                    saved = 1 - by[key]["linear_activation_mb"] / by[(task, "full")]["linear_activation_mb"]
                    loss = by[(task, "full")]["metric_mean"] - by[key]["metric_mean"]
                    options.append({"ratio": ratio, "linear_activation_saved": saved, "points_lost": loss,
                                    "total_activation_saved": 1 - by[key]["activation_mb"] / by[(task, "full")]["activation_mb"],
                                    "ok": saved >= 0.30 and loss <= 1.0})
            if options:
                targets[f"{task}: randomized backprop saves ≥30 % of linear activations at ≤1 point loss"] = {
                    "by_ratio": options, "met": any(o["ok"] for o in options), "judged": learned(task, "full")}
        for base in ("full", "lora"):
            g = gap(f"{base}_naggs", base)
            if g is not None:
                targets[f"{task}: NAG-GS within 1 point of AdamW ({base})"] = {
                    "naggs_minus_adamw_points": g, "met": g >= -1.0, "judged": learned(task, base)}
    commit = commit_label()
    lines = ["# Memory-efficient fine-tuning: minilm on SST-2 (accuracy) and CoLA (MCC), ×100",
             "",
             f"{args.train_samples} training sentences (fixed sample), {args.epochs:g} epoch, batch {args.batch_size}, "
             f"max length {args.max_seq_length}, seeds {args.seeds}, full dev sets, torch threads 1, two runs at a time on "
             f"2 cores. Commit {commit}.", "",
             f"Activations: bytes autograd saves for backward on one fixed batch of 32 × {args.max_seq_length} tokens "
             "(saved-tensor hooks); "
             "'linear' is the part saved by Linear layers. Optimizer state at the end of training. "
             "Step time: median over the run's steps.", "",
             *([f"Left out (not started by --start-by {args.start_by} UTC): {', '.join(args.left_out)}", ""]
               if getattr(args, "left_out", None) else []),
             "| task | run | dev metric (mean ± sd) | lr | trainable params | entries/step (touched) | peak RSS MB | "
             "activations MB (linear) | optimizer state MB | step s | train loss |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        entries = (f"{r['entries_per_step']:,} ({r['touched_entries']:,.0f})" if r["entries_per_step"] else "")
        lines.append(f"| {r['task']} | {r['name']} | {r['metric_mean']:.2f} ± {r['metric_std']:.2f} | {r['lr']:g} | "
                     f"{r['trainable_params']:,} | {entries} | {r['peak_rss_mb']:.0f} | {r['activation_mb']:.1f} "
                     f"({r['linear_activation_mb']:.1f}) | {r['optimizer_state_mb']:.2f} | {r['step_s']:.3f} | "
                     f"{r['train_loss']:.3f} |")
    lines += ["", "SparseGrad / MeProp's trainable params count their dense update ΔW' (12 × 384 × 1536 entries); "
              "each step changes only 'entries/step' of them, and their optimizer state covers the entries touched "
              "over the run.", "", "| target | measured | met |", "|---|---|---|"]
    lines.insert(-2, "Majority class (always the most frequent training label): "
                 + ", ".join(f"{t} {m:.2f}" for t, m in majority.items()) + ".")
    lines.insert(-2, "")
    for k, v in targets.items():
        shown = {kk: vv for kk, vv in v.items() if kk not in ("met", "judged")}
        verdict = ("yes" if v["met"] else "**no**") if v["judged"] else \
            "not judged: the runs it compares are not clearly above the majority class (by > max(1 point, 2 sd))"
        lines.append(f"| {k} | {json.dumps(shown, default=lambda x: round(x, 3))} | {verdict} |")
    summary = {"commit": commit, "settings": vars(args), "rows": rows, "targets": targets,
               "runs": [{k: v for k, v in r.items() if k != "dev_predictions"} for r in runs]}
    return summary, "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, task in zip(axes, TASKS):
        for r in (r for r in rows if r["task"] == task):
            memory = r["activation_mb"] + r["optimizer_state_mb"]
            ax.errorbar(memory, r["metric_mean"], yerr=r["metric_std"], fmt="o", capsize=3)
            ax.annotate(r["name"], (memory, r["metric_mean"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("activations saved for backward + optimizer state (MB, log)")
        ax.set_ylabel(f"{task} dev {METRIC[task]} (×100)")
        ax.set_title(f"minilm on {task}")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def memory_probe(args, out: Path) -> int:
    """The memory columns without the training runs: 3 optimizer steps per set-up, then the probe."""
    from leanformer.files import save_json

    args.train_samples = 96
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in args.runs:
        r = child(name, "SST-2", 0, args)
        results[name] = {"saved_for_backward": r["saved_for_backward"], "optimizer_state_bytes": r["optimizer_state_bytes"],
                         "trainable_params": r["trainable_params"], "train_steps": r["train_steps"],
                         "touched_entries": r.get("touched_entries"), "peak_rss_mb": r["peak_rss_mb"]}
        print(name, results[name], flush=True)
    full = results.get("full")
    lines = ["# Memory probe: minilm, SST-2 sentences, each set-up after 3 optimizer steps (batch 32)", "",
             f"Commit {commit_label()}. Activations: bytes autograd saves for backward on one fixed batch of 32 × "
             f"{args.max_seq_length} tokens (saved-tensor hooks), 'linear' the part saved by nn.Linear layers. "
             "Optimizer state after 3 steps (SparseGrad / MeProp's grows with the entries touched).", "",
             "| run | activations MB | linear-layer part MB | linear part saved vs full | optimizer state MB | trainable params |",
             "|---|---|---|---|---|---|"]
    for name, r in results.items():
        act, lin = r["saved_for_backward"]["activations"] / 2 ** 20, r["saved_for_backward"]["linear_inputs"] / 2 ** 20
        saved = (f"{1 - r['saved_for_backward']['linear_inputs'] / full['saved_for_backward']['linear_inputs']:.0%}"
                 if full and RUNS[name][0] == "full" else "")
        lines.append(f"| {name} | {act:.1f} | {lin:.1f} | {saved} | {r['optimizer_state_bytes'] / 2 ** 20:.2f} | "
                     f"{r['trainable_params']:,} |")
    save_json(out / "memory_probe.json", {"commit": commit_label(), "settings": vars(args), "runs": results})
    (out / "memory_probe.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def main() -> int:
    sys.path.insert(0, str(ROOT / "src"))
    from leanformer.paths import data_root

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    root = data_root()
    p.add_argument("--data", default=str(root / "glue") if root else None, help="directory holding SST-2/ and CoLA/")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    p.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    p.add_argument("--train-samples", type=int, default=1200)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-seq-length", type=int, default=128)
    p.add_argument("--workers", type=int, default=2, help="training runs in parallel (one thread each)")
    p.add_argument("--out", default=str(ROOT / "results" / "memory"))
    p.add_argument("--report-only", action="store_true", help="rebuild the report from saved per-run results")
    p.add_argument("--start-by", metavar="HH:MM", help="start no run after this UTC time (a shared machine's deadline); "
                   "the report lists the runs left out")
    p.add_argument("--memory-probe", action="store_true",
                   help="memory columns only, in one process: each run's set-up trained for 3 steps of 32 sentences "
                        "(SST-2, seed 0), no dev evaluation → memory_probe.{json,md}")
    p.add_argument("--child", nargs=3, metavar=("RUN", "TASK", "SEED"), help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if not args.data:
        print("no data: set LEANFORMER_DATA or pass --data", file=sys.stderr)
        return 2
    if args.child:
        res = child(args.child[0], args.child[1], int(args.child[2]), args)
        Path(args.child_out).write_text(json.dumps(res))
        return 0

    from leanformer.files import save_json

    out = Path(args.out)
    if args.memory_probe:
        return memory_probe(args, out)
    runs_dir = out / "per_run"
    runs_dir.mkdir(parents=True, exist_ok=True)
    # seed by seed (an interrupted run leaves whole seeds), the longest runs of each seed first
    jobs = [(n, t, s) for s in args.seeds for t in args.tasks for n in args.runs] if not args.report_only else []
    jobs.sort(key=lambda j: (j[2], RUNS[j[0]][0] != "full"))

    import datetime

    start_by = None
    if args.start_by:
        hours, minutes = map(int, args.start_by.split(":"))
        start_by = datetime.datetime.now(datetime.timezone.utc).replace(hour=hours, minute=minutes, second=0)

    def run_one(job):
        n, t, s = job
        path = runs_dir / f"{t}_{n}_seed{s}.json"
        if not path.is_file() and start_by is not None and datetime.datetime.now(datetime.timezone.utc) > start_by:
            return None
        started = time.time()
        try:
            res, ran = run_child(__file__, [
                "--child", n, t, str(s), "--child-out", str(path), "--data", args.data,
                "--train-samples", str(args.train_samples), "--epochs", str(args.epochs),
                "--batch-size", str(args.batch_size), "--max-seq-length", str(args.max_seq_length)], path)
        except ChildFailed as e:
            raise ChildFailed(f"{n} {t} seed {s} failed:\n{e}") from None
        if ran:
            print(f"{t:>6} {n:>12} seed {s}: {METRIC[t]} {res[METRIC[t]]:.4f}  step {res['train_seconds_per_step']:.3f}s  "
                  f"({time.time() - started:.0f}s)", flush=True)
        return res

    from tqdm import tqdm

    with ThreadPoolExecutor(max_workers=args.workers) as pool:
        runs = list(tqdm(pool.map(run_one, jobs), total=len(jobs), desc="runs", disable=not jobs))
    args.left_out = [f"{t}/{n}/seed{s}" for (n, t, s), r in zip(jobs, runs) if r is None]
    runs = [r for r in runs if r is not None]
    if jobs and not runs:
        print(f"no run started before --start-by {args.start_by}; nothing written", file=sys.stderr)
        return 1
    if args.report_only:
        runs = [json.loads(f.read_text()) for f in sorted(runs_dir.glob("*_seed*.json"))]
    predictions = {f"{r['task']}/{r['name']}/seed{r['seed']}": r["dev_predictions"] for r in runs}
    summary, table = summarize(runs, args)
    save_json(out / "results.json", summary)
    save_json(out / "dev_predictions.json", predictions)
    (out / "results.md").write_text(table)
    plot(summary["rows"], out / "metric_vs_memory.png")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Adapters out of the box: minilm on SST-2, CoLA, MRPC and RTE with every method's default recipe.

Methods: full fine-tuning, peft LoRA, our LoRA, LoRA-XS at ranks 4/8/16/25, DyLoRA, KronA, peft
LoKr — each with its published recipe (leanformer.adapters.recipe: learning rates, targets, scale,
warm-up, weight decay; peft's methods take the recipe of their leanformer twin) — plus our LoRA with
`--learning-rate auto` (a range test on training batches) and at two more fixed learning rates, so
that auto can be compared with the best fixed rate (picked on dev: an oracle auto does not have).
Nothing is tuned per task, nothing on dev.

Every method gets the same step budget (--steps optimizer steps of --batch-size examples, a fixed
random training sample, max length --max-seq-length with dynamic padding), is evaluated on the
full dev set, and saves its per-example dev predictions, trainable parameters, adapter file size
and the commit hash. The default budget, 150 steps of 8 examples per task, is the most that lets the
36 (method, seed) runs × 4 tasks fit in about an hour of a 2-core machine; it is short of the papers'
epochs, so the recipes' learning rates are the ones chosen for short budgets (see each method's
recipe). Each (method, seed) runs in its own subprocess with one thread, --workers at a time (the
machine has 2 cores); a rerun skips finished runs.

    flock /tmp/leanformer-bench.lock .venv/bin/python benchmarks/adapters_bench.py   # → results/adapters/
    .venv/bin/python benchmarks/adapters_bench.py --report-only                      # table + plots again
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from child_runs import ChildFailed, run_child
from provenance import git_state

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("SST-2", "CoLA", "MRPC", "RTE")
PRIMARY = {"SST-2": "accuracy", "CoLA": "mcc", "MRPC": "accuracy", "RTE": "accuracy"}
XS_RANKS = (4, 8, 16, 25)
FIXED_LRS = (5e-4,)  # the LoRA paper's rate; with the recipe's 2e-3: the fixed-rate grid auto is compared with
# In the order they run (a run cut short keeps every seed of the first ones): the targets' pairs first.
METHODS = (["full", "lora", "lora_xs_r16", "krona", "lora_auto"] + [f"lora_lr{lr:g}" for lr in FIXED_LRS]
           + ["peft_lora", "peft_lokr", "dylora"] + [f"lora_xs_r{r}" for r in XS_RANKS if r != 16])


# ---------------------------------------------------------------------------------------------
# One (method, seed): all four tasks


def build(method: str, model):
    """(method argument for lf.finetune, the model (peft wraps it), recipe, head lr, range test)."""
    import peft

    import leanformer as lf
    from leanformer.adapters.recipe import FULL_FINETUNING
    from leanformer.architectures import adapter_targets
    from leanformer.train.lr_finder import RangeTest

    if method == "full":
        return "full", model, FULL_FINETUNING, None, None
    if method.startswith("lora_xs_r"):
        rank, recipe = int(method.rsplit("r", 1)[1]), lf.LoRAXS.recipe
        cfg = lf.LoRAXS(rank=rank, alpha=recipe.alpha, targets=adapter_targets(model, recipe.roles))
        return cfg, model, recipe, recipe.head_learning_rate, None
    if method in ("peft_lora", "peft_lokr"):
        recipe = (lf.LoRA if method == "peft_lora" else lf.KronA).recipe
        targets = adapter_targets(model, recipe.roles)
        if method == "peft_lora":
            pcfg = peft.LoraConfig(r=8, lora_alpha=recipe.alpha, target_modules=targets, modules_to_save=["classifier"])
        else:  # the same ΔW factor shapes as our KronA (near-square), w2 full (r ≥ max side / 2), scale α/r = alpha
            pcfg = peft.LoKrConfig(r=24, alpha=24 * recipe.alpha, target_modules=targets, modules_to_save=["classifier"])
        return None, peft.get_peft_model(model, pcfg), recipe, recipe.head_learning_rate, None
    family = {"lora": lf.LoRA, "dylora": lf.DyLoRA, "krona": lf.KronA}[method.split("_")[0]]
    recipe = family.recipe
    kwargs = dict(targets=adapter_targets(model, recipe.roles), alpha=recipe.alpha)
    cfg = family(**kwargs) if family is lf.KronA else family(rank=8, **kwargs)
    if method.startswith("lora_lr"):
        from dataclasses import replace

        recipe = replace(recipe, learning_rate=float(method[len("lora_lr"):]))
    return cfg, model, recipe, recipe.head_learning_rate, RangeTest() if method == "lora_auto" else None


def adapter_file_bytes(method: str, model, scratch: Path) -> int:
    """Bytes of the weights file a user keeps for this fine-tune (adapter + head; the whole model for full)."""
    import leanformer as lf

    out = scratch / "saved"
    if method.startswith("peft_"):
        model.save_pretrained(str(out))
        return (out / "adapter_model.safetensors").stat().st_size
    if method == "full":
        model.save_pretrained(str(out))
        return (out / "model.safetensors").stat().st_size
    lf.save(model, None, out)
    return (out / "leanformer.safetensors").stat().st_size


def dev_predictions(model, tok, task, max_len: int):
    """Per-example dev predictions, batched in length order (less padding), returned in dev order."""
    import numpy as np

    from leanformer.evaluation import predict

    d = task.dev
    lengths = [len(tok(a, b)["input_ids"]) for a, b in zip(d.text_a, d.text_b or [None] * len(d.text_a))]
    order = np.argsort(lengths, kind="stable")
    sub = lambda xs: [xs[i] for i in order]  # noqa: E731
    p = predict(model, tok, sub(d.text_a), sub(d.text_b) if d.text_b else None, 64, max_len, task.is_regression)
    out = np.empty_like(p)
    out[order] = p
    return out


def child(method: str, seed: int, args) -> dict:
    import torch

    torch.set_num_threads(1)
    from transformers import TrainingArguments, set_seed
    from transformers.utils import logging as hf_logging

    import leanformer as lf
    from leanformer.adapters import trainable_parameters
    from leanformer.evaluation import task_metrics
    from leanformer.tasks import load_task

    hf_logging.set_verbosity_error()
    results = {}
    for name in args.tasks:
        task = load_task(str(Path(args.data) / name))
        set_seed(seed)  # the head's and the adapter's initialisation follow the seed
        model, tok = lf.load("minilm", head="sequence-classification", num_labels=task.num_labels)
        cfg, model, recipe, head_lr, range_test = build(method, model)
        with tempfile.TemporaryDirectory() as scratch:
            training = TrainingArguments(
                output_dir=scratch, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                per_device_eval_batch_size=64, seed=seed, save_strategy="no", report_to="none", disable_tqdm=True,
                logging_steps=10, train_sampling_strategy="group_by_length", use_cpu=True,
                **recipe.training_arguments())
            t = time.perf_counter()
            res = lf.finetune(model, tok, task, training, method=cfg, max_seq_length=args.max_seq_length,
                              max_train_samples=args.train_samples, head_learning_rate=head_lr,
                              learning_rate_test=range_test, evaluate=False)
            train_s = time.perf_counter() - t
            model.eval()
            preds = dev_predictions(model, tok, task, args.max_seq_length)
            file_bytes = adapter_file_bytes(method, model, Path(scratch))
        metrics = task_metrics(preds, task.dev.labels, task.metrics)
        results[name] = {**metrics, "primary": metrics[PRIMARY[name]],
                         "trainable_params": trainable_parameters(model)["trainable"], "file_bytes": file_bytes,
                         "learning_rate": res["learning_rate"], "head_learning_rate": head_lr,
                         "train_loss": res["train_loss"], "loss_curve": res["loss_curve"],
                         "train_seconds": train_s, "train_seconds_per_step": res["train_seconds_per_step"],
                         "warnings": res["warnings"], "lr_range_test": res.get("learning_rate_test"),
                         "predictions": preds.tolist()}
    return {"method": method, "seed": seed, "recipe": recipe.to_json(), "tasks": results, **git_state()}


# ---------------------------------------------------------------------------------------------
# Report


def summarize(runs: list[dict], args) -> tuple[dict, str]:
    import numpy as np

    rows = []
    for method in METHODS:
        rs = [r for r in runs if r["method"] == method]
        if not rs:
            continue
        row = {"method": method, "seeds": len(rs), "tasks": {}}
        for name in args.tasks:
            vals = np.array([r["tasks"][name]["primary"] for r in rs]) * 100
            row["tasks"][name] = {"mean": float(vals.mean()), "half_range": float((vals.max() - vals.min()) / 2),
                                  "runs": vals.tolist(),
                                  "learning_rate": [r["tasks"][name]["learning_rate"] for r in rs]}
        per_seed_mean = [np.mean([r["tasks"][n]["primary"] * 100 for n in args.tasks]) for r in rs]
        row["mean"] = float(np.mean(per_seed_mean))
        row["mean_half_range"] = float((max(per_seed_mean) - min(per_seed_mean)) / 2)
        first = rs[0]["tasks"][args.tasks[0]]
        row["trainable_params"] = first["trainable_params"]
        row["file_bytes"] = first["file_bytes"]
        row["learning_rate"] = rs[0]["recipe"]["learning_rate"] if method != "lora_auto" else "auto"
        row["head_learning_rate"] = rs[0]["recipe"]["head_learning_rate"]
        row["train_seconds_per_step"] = float(np.median([r["tasks"][n]["train_seconds_per_step"]
                                                         for r in rs for n in args.tasks]))
        rows.append(row)
    by = {r["method"]: r for r in rows}

    majority = majority_baselines(args)
    majority_mean = sum(majority.values()) / len(majority)

    def judged(*methods: str) -> bool:
        # A comparison says something only when a method in it has learned (its mean is more than one
        # point above the majority-class mean): two methods both at the baseline "tie" vacuously, while
        # one that learned against one that did not is a real difference.
        return any(by[m]["mean"] - majority_mean > 1.0 for m in methods)

    targets = {}
    if {"lora", "full"} <= set(by):
        gap = by["full"]["mean"] - by["lora"]["mean"]
        targets["lora_within_1pt_of_full"] = {"gap_points": gap, "met": gap <= 1.0, "methods": ("lora", "full")}
    for r in XS_RANKS:
        xs = by.get(f"lora_xs_r{r}")
        if xs and "lora" in by:
            gap = by["lora"]["mean"] - xs["mean"]
            fewer = by["lora"]["trainable_params"] / xs["trainable_params"]
            smaller = by["peft_lora"]["file_bytes"] / xs["file_bytes"] if "peft_lora" in by else None
            targets[f"lora_xs_r{r}_within_1pt_of_lora_10x_fewer_10x_smaller"] = {
                "gap_points": gap, "param_ratio": fewer, "file_ratio_vs_peft_lora": smaller,
                "met": gap <= 1.0 and fewer >= 10 and (smaller or 0) >= 10, "methods": ("lora", f"lora_xs_r{r}")}
    if {"krona", "lora"} <= set(by):
        gap = by["lora"]["mean"] - by["krona"]["mean"]
        targets["krona_within_1pt_of_lora"] = {"gap_points": gap, "met": gap <= 1.0, "methods": ("lora", "krona")}
    fixed = [m for m in ["lora"] + [f"lora_lr{lr:g}" for lr in FIXED_LRS] if m in by]
    if "lora_auto" in by and fixed:
        best = max(fixed, key=lambda m: by[m]["mean"])
        gap = by[best]["mean"] - by["lora_auto"]["mean"]
        targets["lr_auto_within_1pt_of_best_fixed_lr"] = {
            "best_fixed": best, "best_fixed_lr": by[best]["learning_rate"], "gap_points": gap, "met": gap <= 1.0,
            "methods": (best, "lora_auto")}

    for t in targets.values():
        t["judged"] = judged(*t.pop("methods"))
    state = git_state()
    commits = sorted({r["commit"] for r in runs})
    lines = [f"# Adapters with their default recipes: minilm on {', '.join(args.tasks)}", "",
             f"Budget: {args.steps} optimizer steps of {args.batch_size} examples for every method (a fixed random "
             f"sample of at most {args.train_samples} training examples), max length {args.max_seq_length} with "
             f"dynamic padding, {len(args.seeds)} seeds ({', '.join(map(str, args.seeds))}), full dev sets, one thread "
             "per run. No per-task tuning; lora_auto's range test adds 40 training batches before its run (no dev data).",
             f"Runs at commit(s) {', '.join(c[:10] for c in commits)}; dirty working tree: "
             f"{any(r['dirty'] for r in runs)} (other work in progress was uncommitted). Report written at "
             f"{state['commit'][:10]}.", "",
             "Scores: SST-2 / MRPC / RTE accuracy, CoLA Matthews correlation, ×100, mean ± half-range over seeds; "
             "mean = the four tasks' mean.", "",
             "| method | " + " | ".join(args.tasks) + " | mean | trainable params | adapter file | lr (head lr) |",
             "|---|" + "---|" * len(args.tasks) + "---|---|---|---|"]
    for r in rows:
        cells = " | ".join(f"{r['tasks'][n]['mean']:.1f} ± {r['tasks'][n]['half_range']:.1f}" for n in args.tasks)
        lr = r["learning_rate"] if isinstance(r["learning_rate"], str) else f"{r['learning_rate']:g}"
        if r["method"] == "lora_auto":
            picked = sorted({f"{v:.2g}" for n in args.tasks for v in r["tasks"][n]["learning_rate"]})
            lr = f"auto: {', '.join(picked)}"
        head = f" ({r['head_learning_rate']:g})" if r["head_learning_rate"] else ""
        lines.append(f"| {r['method']} | {cells} | {r['mean']:.1f} ± {r['mean_half_range']:.1f} | "
                     f"{r['trainable_params']:,} | {r['file_bytes'] / 1024:,.1f} KiB | {lr}{head} |")
    lines.append("| majority class (no training) | " + " | ".join(f"{majority[n]:.1f}" for n in args.tasks)
                 + f" | {sum(majority.values()) / len(majority):.1f} | 0 | — | — |")
    missing = [m for m in args.methods if m not in by]
    partial = [f"{r['method']} ({r['seeds']} of {len(args.seeds)} seeds)" for r in rows if r["seeds"] < len(args.seeds)]
    if missing or partial:
        lines += ["", f"Not run (the run was stopped at the time limit): {', '.join(missing) or '—'}; "
                      f"incomplete: {', '.join(partial) or '—'}."]
    lines += ["", "A method at the majority-class row has not learned the task within the budget; a target met "
              "there (two methods both at the baseline) says nothing about the methods, so it is not judged."]
    lines += ["", "| target | measured | met |", "|---|---|---|"]
    for k, v in targets.items():
        shown = {kk: (float(f"{vv:.3g}") if isinstance(vv, float) else vv) for kk, vv in v.items()
                 if kk not in ("met", "judged")}
        verdict = ("yes" if v["met"] else "**no**") if v["judged"] else \
            "not judged: every method in it is within 1 point of the majority-class mean"
        if "param_ratio" in v and (v["param_ratio"] < 10 or (v["file_ratio_vs_peft_lora"] or 0) < 10):
            verdict += " (size part: **no**)"  # the size criteria hold or fail whatever was learned
        lines.append(f"| {k} | {json.dumps(shown)} | {verdict} |")
    summary = {"rows": rows, "targets": targets, "majority_class": majority, "settings": vars(args), "methods": METHODS,
               **state,
               "run_commits": commits}
    return summary, "\n".join(lines) + "\n"


def majority_baselines(args) -> dict[str, float]:
    """Each task's primary score (×100) of always predicting the most frequent training label."""
    from collections import Counter

    from leanformer.evaluation import task_metrics
    from leanformer.tasks import load_task

    out = {}
    for name in args.tasks:
        task = load_task(str(Path(args.data) / name))
        label = Counter(task.train.labels).most_common(1)[0][0]
        out[name] = 100 * task_metrics([label] * len(task.dev), task.dev.labels, task.metrics)[PRIMARY[name]]
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    for ax, key, label in ((axes[0], "trainable_params", "trainable parameters"),
                           (axes[1], "file_bytes", "adapter file size (bytes)")):
        for r in rows:
            ax.errorbar(r[key], r["mean"], yerr=r["mean_half_range"], fmt="o", capsize=3)
            ax.annotate(r["method"], (r[key], r["mean"]), textcoords="offset points", xytext=(5, 3), fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel(f"{label} (log)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean dev score over the tasks (×100)")
    fig.suptitle("minilm, default recipes, same step budget: quality vs cost")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    sys.path.insert(0, str(ROOT / "src"))
    from leanformer.paths import data_root

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    root = data_root()
    p.add_argument("--data", default=str(root / "glue") if root else None, help="directory holding the GLUE tasks")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--train-samples", type=int, default=4000)
    p.add_argument("--max-seq-length", type=int, default=128)
    p.add_argument("--workers", type=int, default=2, help="runs in parallel (one thread each)")
    p.add_argument("--out", default=str(ROOT / "results" / "adapters"))
    p.add_argument("--child", nargs=2, metavar=("METHOD", "SEED"), help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    p.add_argument("--report-only", action="store_true", help="rebuild the report from saved per-run results")
    args = p.parse_args()
    if not args.data:
        print("no data: set LEANFORMER_DATA or pass --data", file=sys.stderr)
        return 2
    if args.child:
        res = child(args.child[0], int(args.child[1]), args)
        Path(args.child_out).write_text(json.dumps(res))
        return 0

    from leanformer.files import save_json

    out = Path(args.out)
    runs_dir = out / "per_run"  # (not "runs/": that name is git-ignored)
    runs_dir.mkdir(parents=True, exist_ok=True)
    # method by method, every seed of one before the next: a run cut short has fewer methods, never fewer seeds
    jobs = [] if args.report_only else [(m, s) for m in args.methods for s in args.seeds]

    def run_one(job):
        m, s = job
        t = time.time()
        try:
            res, ran = run_child(__file__, [
                "--child", m, str(s), "--child-out", str(runs_dir / f"{m}_seed{s}.json"), "--data", args.data,
                "--tasks", *args.tasks, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
                "--train-samples", str(args.train_samples), "--max-seq-length", str(args.max_seq_length)],
                runs_dir / f"{m}_seed{s}.json")
        except ChildFailed as e:
            print(f"{m} seed {s} failed:\n{e}", flush=True)
            return
        if ran:
            scores = "  ".join(f"{n} {v['primary'] * 100:.1f}" for n, v in res["tasks"].items())
            print(f"{m:>14} seed {s}: {scores}  ({time.time() - t:.0f}s)", flush=True)

    with ThreadPoolExecutor(max_workers=args.workers) as pool:
        list(pool.map(run_one, jobs))
    runs = [json.loads(f.read_text()) for f in sorted(runs_dir.glob("*_seed*.json"))]
    runs = [r for r in runs if r["method"] in args.methods and r["seed"] in args.seeds]
    summary, table = summarize(runs, args)
    save_json(out / "results.json", summary)
    (out / "results.md").write_text(table)
    plot(summary["rows"], out / "score_vs_cost.png")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

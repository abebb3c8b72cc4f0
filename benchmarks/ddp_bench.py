"""Fine-tuning as one process and as two (DDP over gloo on the CPU): the same minilm LoRA fine-tune
on the same SST-2 sample, one process with batch 32 against two processes with batch 16 each, so
every optimizer step sees the same 32 sentences (the seeded random sampler gives both the same
permutation; the two processes split each batch of 32). Plots both loss curves per step.

A third run shows why leanformer's TaskTrainer treats a classification loss as a per-batch mean:
two processes with transformers' default loss handling for a model whose forward takes **kwargs
(the loss is multiplied by the process count, as if the model had normalised it over all processes;
AdamW with clipping hardly notices the doubled gradient, the logged loss shows it).

Each run is launched the way users launch it (`torchrun --nproc_per_node N`), one torch thread per
process, so one process uses one core and two use two.

    .venv/bin/python benchmarks/ddp_bench.py        # → results/ddp/{results.json,results.md,loss_curves.png}
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from provenance import commit_label

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "results" / "ddp"
GLOBAL_BATCH = 32
RUNS = {"1 process": (1, False), "2 processes": (2, False), "2 processes, stock loss scaling": (2, True)}


def worker(args) -> None:
    """One training run inside torchrun; the process with rank 0 writes the curve and metrics."""
    from transformers import TrainerCallback, TrainingArguments, set_seed

    import leanformer as lf
    from leanformer.tasks import load_task
    from leanformer.train import finetuning

    torch.set_num_threads(1)
    if args.stock_loss_scaling:
        class StockLossScaling(finetuning.TaskTrainer):
            def __init__(self, *a, **k):
                super().__init__(*a, **k)
                self.model_accepts_loss_kwargs = True  # transformers' default for this model class
        finetuning.TaskTrainer = StockLossScaling

    class Curve(TrainerCallback):
        def __init__(self):
            self.losses, self.started, self.seconds = [], None, None

        def on_train_begin(self, *a, **k):
            self.started = time.perf_counter()

        def on_log(self, a, state, control, logs=None, **k):
            if "loss" in logs:  # Trainer's logged loss: the mean over all processes
                self.losses.append(logs["loss"])

        def on_train_end(self, *a, **k):
            self.seconds = time.perf_counter() - self.started

    task = load_task(args.task)
    set_seed(0)
    model, tok = lf.load("minilm", head="sequence-classification", num_labels=task.num_labels)
    curve = Curve()
    with tempfile.TemporaryDirectory() as scratch:
        training = TrainingArguments(
            output_dir=scratch, learning_rate=args.learning_rate, num_train_epochs=args.epochs, warmup_steps=0.06,
            per_device_train_batch_size=GLOBAL_BATCH // args.processes, per_device_eval_batch_size=64,
            logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=True, seed=0)
        metrics = lf.finetune(model, tok, task, training, method=lf.LoRA(rank=8), head_learning_rate=args.head_learning_rate,
                              max_seq_length=64, max_train_samples=args.train_samples,
                              max_eval_samples=args.eval_samples, callbacks=[curve])
    if training.process_index == 0:
        Path(args.worker_out).write_text(json.dumps({"losses": curve.losses, "train_seconds": curve.seconds,
                                                     "metrics": metrics}))


def launch(name: str, processes: int, stock: bool, args) -> dict:
    out = OUT / f"run_{processes}p{'_stock' if stock else ''}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
           __file__, "--worker", "--processes", str(processes), "--worker-out", str(out), "--task", args.task,
           "--epochs", str(args.epochs), "--train-samples", str(args.train_samples),
           "--eval-samples", str(args.eval_samples), "--learning-rate", str(args.learning_rate),
           "--head-learning-rate", str(args.head_learning_rate)] + (["--stock-loss-scaling"] if stock else [])
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT / "src"))
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-4000:]}")
    res = json.loads(out.read_text())
    shown = " ".join(["python", *cmd[1:]]).replace(str(ROOT) + "/", "")
    res.update(name=name, processes=processes, stock_loss_scaling=stock, wall_seconds=wall, command=shown)
    print(f"{name:>32}: {len(res['losses'])} steps, first loss {res['losses'][0]:.4f}, last {res['losses'][-1]:.4f}, "
          f"train {res['train_seconds']:.1f}s, wall {wall:.1f}s, dev acc {res['metrics']['accuracy']:.4f}", flush=True)
    return res


def report(runs: list[dict], args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from leanformer.files import atomic_write_bytes, save_json

    one, two = runs[0], runs[1]
    gap = max(abs(a - b) for a, b in zip(one["losses"], two["losses"]))
    ratio = [b / a for a, b in zip(one["losses"], runs[2]["losses"])]
    summary = {"commit": commit_label(), "settings": vars(args) | {"global_batch": GLOBAL_BATCH, "model": "minilm",
                                                                 "adapter": "LoRA rank 8 on query, value",
                                                                 "torch_threads_per_process": 1},
               "max_abs_loss_gap_1p_vs_2p": gap, "stock_over_1p_loss_ratio_mean": sum(ratio) / len(ratio),
               "runs": runs}
    OUT.mkdir(parents=True, exist_ok=True)
    save_json(OUT / "results.json", summary)
    lines = [f"# Fine-tuning as 1 and 2 processes (minilm, LoRA r=8, SST-2 sample of {args.train_samples}, "
             f"{args.epochs:g} epoch(s), global batch {GLOBAL_BATCH}, lr {args.learning_rate:g} (head "
             f"{args.head_learning_rate:g}), max length 64, 1 torch thread per process, CPU)", "",
             f"commit {summary['commit']}", "",
             "| run | steps | first loss | last loss | mean loss | train s | wall s (incl. start-up) | dev accuracy |",
             "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        L = r["losses"]
        lines.append(f"| {r['name']} | {len(L)} | {L[0]:.4f} | {L[-1]:.4f} | {sum(L) / len(L):.4f} | "
                     f"{r['train_seconds']:.1f} | {r['wall_seconds']:.1f} | {r['metrics']['accuracy']:.4f} |")
    lines += ["", f"Largest per-step loss difference between 1 and 2 processes: {gap:.4f} (same sentences per step; "
              "dropout masks and summation order differ).",
              f"Stock loss scaling with 2 processes logs {summary['stock_over_1p_loss_ratio_mean']:.2f}× the loss of the "
              "1-process run on average: transformers multiplies the loss of a model whose forward takes **kwargs by "
              "the process count, which is right only for a loss normalised over all processes' tokens; the "
              "classification head's loss is a per-batch mean, so loss and gradient come out doubled. AdamW with "
              "gradient clipping hardly notices a constant gradient scale (compare the dev accuracies); the logged "
              "loss, grad-norm logs and optimizers without that invariance (SGD) do.", "",
              "Commands (the worker is this script; users run the CLI the same way):", ""]
    lines += [f"    {r['command']}" for r in runs[:2]]
    lines += ["", "Multi-GPU: `accelerate launch --num_processes N -m leanformer.cli finetune MODEL --task TASK --out DIR` "
              "or `torchrun --nproc_per_node N -m leanformer.cli finetune …`."]
    atomic_write_bytes(OUT / "results.md", ("\n".join(lines) + "\n").encode())

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r, style in zip(runs, ("-", "--", ":")):
        ax.plot(range(1, len(r["losses"]) + 1), r["losses"], style, marker=".", label=f"{r['name']} ({r['train_seconds']:.0f}s)")
    ax.set_xlabel("optimizer step (32 sentences each)")
    ax.set_ylabel("training loss (mean over processes)")
    ax.set_title("minilm LoRA on SST-2: 1 vs 2 processes")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(OUT / "loss_curves.png", dpi=120)
    print("\n".join(lines))


def main() -> int:
    sys.path.insert(0, str(ROOT / "src"))
    from leanformer.paths import data_root

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    root = data_root()
    p.add_argument("--task", default=str(root / "glue" / "SST-2") if root else None)
    p.add_argument("--train-samples", type=int, default=2048)
    p.add_argument("--eval-samples", type=int, default=256)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--learning-rate", type=float, default=2e-3, help="LoRA learning rate")
    p.add_argument("--head-learning-rate", type=float, default=5e-3, help="classifier head learning rate")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--processes", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    p.add_argument("--stock-loss-scaling", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if not args.task:
        print("no data: set LEANFORMER_DATA or pass --task", file=sys.stderr)
        return 2
    if args.worker:
        worker(args)
        return 0
    OUT.mkdir(parents=True, exist_ok=True)
    runs = [launch(name, n, stock, args) for name, (n, stock) in RUNS.items()]
    report(runs, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

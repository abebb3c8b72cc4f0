"""Cosine linearity regulariser, small scale: the same Llama-shaped decoder pretrained from scratch on
TinyStories text with λ = 0 and λ = 0.5 (same seed, data order and steps); compares validation
perplexity and the per-layer linearity profile (Razzhigaev et al., "Your Transformer is Secretly Linear", ACL 2024).

    .venv/bin/python benchmarks/regularizer_bench.py                 # both runs, then the report
    .venv/bin/python benchmarks/regularizer_bench.py --lam 0.5       # one run (e.g. in parallel)
    .venv/bin/python benchmarks/regularizer_bench.py --report        # merge runs → table + plots

Writes results/regularizer/{run_lam*.json, results.json, results.md, *.png}. torch uses 1 thread.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parents[1] / "results" / "regularizer"


def token_stream(tokenizer, path: Path) -> torch.Tensor:
    # Paragraphs joined by single newlines into one BOS-prefixed stream (the excerpt has no story markers).
    raw = path.read_text(encoding="utf-8")
    text = "\n".join(p.strip() for p in re.split(r"\n\s*\n", raw) if p.strip())
    return torch.tensor(tokenizer(text)["input_ids"])


def run_one(lam: float, args) -> Path:
    from transformers import AutoTokenizer

    from leanformer.models import stories260k_dir
    from leanformer.paths import data_root
    from leanformer.files import save_json
    from leanformer.train.pretrain import PretrainConfig, pretrain, split_stream

    root = data_root(required=True)
    tok = AutoTokenizer.from_pretrained(stories260k_dir())  # llama2.c's 512-token TinyStories vocabulary
    train_ids, val_ids = split_stream(token_stream(tok, root / "text/tinystories.valid.txt"), 0.1)
    cfg = PretrainConfig(lam=lam, steps=args.steps, seed=args.seed, batch_size=args.batch_size,
                         n_layers=args.layers, dim=args.dim, eval_every=args.eval_every)
    _, res = pretrain(cfg, train_ids, val_ids)
    res["n_train_tokens"], res["n_val_tokens"] = len(train_ids), len(val_ids)
    res["device"] = "cuda" if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} thread)"
    path = OUT / f"run_lam{lam:g}.json"
    save_json(path, res)
    print(f"λ={lam}: val ppl {res['val_perplexity']:.3f}, mean linearity {sum(res['profile']['linearity']) / len(res['profile']['linearity']):.4f}")
    return path


def report() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from leanformer.files import atomic_write_bytes, load_json, save_json

    runs = sorted((load_json(p) for p in OUT.glob("run_lam*.json")), key=lambda r: r["config"]["lam"])
    if not runs:
        sys.exit("no runs in results/regularizer; run with --lam first")
    keys = ("linearity", "linearity_wo_residual", "cosine")
    lines = ["# Cosine regulariser (λ Σ(1 − cos(h_i, h_{i−1}))), small-scale pretraining", "",
             f"Llama-shaped decoder dim {runs[0]['config']['dim']}, {runs[0]['config']['n_layers']} layers, "
             f"{runs[0]['total_params']:,} params, {runs[0]['config']['steps']} steps × {runs[0]['config']['batch_size']} × "
             f"{runs[0]['config']['seq_len']} tokens, seed {runs[0]['config']['seed']}; TinyStories excerpt "
             f"({runs[0]['n_train_tokens']:,} train / {runs[0]['n_val_tokens']:,} held-out tokens); {runs[0]['device']}.", "",
             "| λ | val NLL | val perplexity | mean linearity | mean linearity w/o residual | mean cos | s/step (median) |",
             "|---|---|---|---|---|---|---|"]
    for r in runs:
        p = r["profile"]
        mean = {k: sum(p[k]) / len(p[k]) for k in keys}
        lines.append(f"| {r['config']['lam']:g} | {r['val_nll']:.4f} | {r['val_perplexity']:.3f} | {mean['linearity']:.4f} | "
                     f"{mean['linearity_wo_residual']:.4f} | {mean['cosine']:.4f} | {r['train_seconds_per_step']:.3f} |")
    lines += ["", "Per-transition profile (h_i → h_{i+1}, pre-final-norm residual stream, held-out tokens):", "",
              "| λ | " + " | ".join(f"{k} {i}→{i + 1}" for k in ("lin",) for i in range(len(runs[0]["profile"]["linearity"]))) + " |",
              "|---|" + "---|" * len(runs[0]["profile"]["linearity"])]
    for r in runs:
        lines.append(f"| {r['config']['lam']:g} | " + " | ".join(f"{v:.4f}" for v in r["profile"]["linearity"]) + " |")
    lines.append("")
    lines.append("| λ | " + " | ".join(f"w/o res {i}→{i + 1}" for i in range(len(runs[0]["profile"]["linearity"]))) + " |")
    lines.append("|---|" + "---|" * len(runs[0]["profile"]["linearity"]))
    for r in runs:
        lines.append(f"| {r['config']['lam']:g} | " + " | ".join(f"{v:.4f}" for v in r["profile"]["linearity_wo_residual"]) + " |")
    save_json(OUT / "results.json", {"runs": runs})
    atomic_write_bytes(OUT / "results.md", ("\n".join(lines) + "\n").encode())

    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    for r in runs:
        lab = f"λ={r['config']['lam']:g}"
        for ax, k in zip(axes[:3], keys):
            ax.plot(range(len(r["profile"][k])), r["profile"][k], marker="o", label=lab)
            ax.set_title(k.replace("_", " "))
            ax.set_xlabel("transition i → i+1")
        axes[3].plot([h["step"] for h in r["history"]], [h["val_perplexity"] for h in r["history"]], marker="o", label=lab)
    axes[3].set_title("validation perplexity")
    axes[3].set_xlabel("step")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(OUT / "profiles.png", dpi=110)
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lam", type=float, default=None, help="run only this λ")
    p.add_argument("--report", action="store_true", help="only merge existing runs into the report")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    if not args.report:
        for lam in ([args.lam] if args.lam is not None else [0.0, 0.5]):
            run_one(lam, args)
    if args.report or args.lam is None:
        report()


if __name__ == "__main__":
    main()

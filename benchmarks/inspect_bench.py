"""inspect vs a paper-faithful reference pipeline, same model, same tokens, one run.

Reference (as the papers' code does it): keep every token's hidden state of every layer in memory,
linearity by SVD-based least squares per layer pair (float64, guarded pseudo-inverse), anisotropy
from the full SVD, and TwoNN by a point-by-point Python loop over 4096 points. Ours: leanformer's
`inspect` (streaming moments, reservoir sample, vectorised nearest neighbours).

Each (pipeline, token count) runs in its own subprocess so peak RSS is its own; torch uses one
thread in both so the shared 2-core machine affects them alike. Both TwoNN estimators use the
same 4096 token positions (`sample_positions`, seeded) and the same fit (smallest 90 % of μ).

    python benchmarks/inspect_bench.py [--model minilm] [--tokens 16384 65536] [--out results/inspect]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from leanformer.metrics.schema import METRICS, TRANSITION_METRICS

REFERENCE_LAYER_METRICS = (METRICS["anisotropy"], METRICS["intrinsic_dim"])  # the layer metrics the reference computes


def markdown_header(first_column: str, metrics) -> list[str]:
    """The two header lines of a markdown table: a first column, then one per metric (its label)."""
    return [f"| {first_column} | " + " | ".join(m.label for m in metrics) + " |", "|---" * (len(metrics) + 1) + "|"]


def reference_pipeline(model, tokenizer, tokens: int, max_length: int, batch_size: int, sample_size: int, seed: int):
    from leanformer.capture import iter_hidden_states
    from leanformer.text import token_chunks
    from leanformer.metrics import sample_positions

    chunks = token_chunks(tokenizer, bench_texts(), max_length=max_length, tokens=tokens)
    stored, lasts, offset = None, [], 0
    for states, last, _ in iter_hidden_states(model, tokenizer, chunks, batch_size=batch_size):
        stored = [[s] for s in states] if stored is None else [acc + [s] for acc, s in zip(stored, states)]
        lasts.append(last + offset)
        offset += states[0].shape[0]
    H = [torch.cat(s).double().numpy() for s in stored]  # every token, every layer
    last = torch.cat(lasts).numpy()

    def normalise(M):
        M = M - M.mean(0)
        return M / np.linalg.norm(M)

    def svd_linearity(X, Y):
        Xn, Yn = normalise(X), normalise(Y)
        U, S, Vt = np.linalg.svd(Xn, full_matrices=False)
        keep = S > S[0] * 1e-7  # the reference's 1/S, guarded
        A = (Vt[keep].T / S[keep]) @ (U[:, keep].T @ Yn)
        return 1 - np.linalg.norm(Xn @ A - Yn) ** 2

    def cos_rows(X, Y):
        return (X * Y).sum(1) / (np.linalg.norm(X, axis=1) * np.linalg.norm(Y, axis=1))

    def twonn_loop(X, keep=0.9):
        X = X - X.mean(0)
        X = X / np.linalg.norm(X, axis=1).mean()
        mus = []
        for i in range(len(X)):  # point by point, as in the reference
            d = np.linalg.norm(X - X[i], axis=1)
            d[i] = np.inf
            r1, r2 = np.sort(d)[:2]
            if r1 > 1e-7 and r2 / r1 > 1 + 1e-7:
                mus.append(r2 / r1)
        mu = np.sort(mus)
        n_keep = int(len(mu) * keep)
        x = np.log(mu[:n_keep])
        y = -np.log(1 - np.arange(1, n_keep + 1) / len(mu))
        return float((x * y).sum() / (x * x).sum())

    sample = sample_positions(len(H[0]), sample_size, seed)  # the same token positions inspect uses

    layers, transitions = [], []
    for i, X in enumerate(H):
        S = np.linalg.svd(X - X.mean(0), compute_uv=False)
        layers.append({"index": i, "anisotropy": float(S[0] ** 2 / (S ** 2).sum()),
                       "intrinsic_dim": twonn_loop(X[sample])})
    for i in range(len(H) - 1):
        X, Y = H[i], H[i + 1]
        transitions.append({"from": i, "to": i + 1, "linearity": float(svd_linearity(X, Y)),
                            "linearity_wo_residual": float(svd_linearity(X, Y - X)),
                            "block_influence": float(1 - cos_rows(X, Y).mean()),
                            "angular_distance": float((np.arccos(np.clip(cos_rows(X[last], Y[last]), -1, 1)) / np.pi).mean())})
    return {"n_tokens": len(H[0]), "layers": layers, "transitions": transitions}


def bench_texts() -> list[str]:
    from leanformer.paths import data_root
    from leanformer.text import default_corpus, read_text_files

    root = data_root()
    if root is None:
        return default_corpus()
    return read_text_files([root / "text" / "wikitext2.test.txt", root / "text" / "wikitext2.valid.txt"])


def worker(args) -> None:
    """One measurement in a fresh process: prints a JSON line."""
    torch.set_num_threads(1)
    tokens = args.tokens[0]
    import leanformer as lf
    from leanformer.runtime import peak_rss_mb

    model, tokenizer = lf.load(args.model)
    rss_loaded = peak_rss_mb()
    started = time.perf_counter()
    if args.worker == "ours":
        profile = lf.inspect(model, tokenizer, bench_texts(), tokens=tokens, max_length=args.max_length,
                             batch_size=args.batch_size, sample_size=args.sample_size, seed=args.seed, progress=False)
        result = {"n_tokens": profile.n_tokens, "layers": profile.layers, "transitions": profile.transitions}
    else:
        result = reference_pipeline(model, tokenizer, tokens, args.max_length, args.batch_size,
                                    args.sample_size, args.seed)
    result.update(seconds=time.perf_counter() - started, peak_rss_mb=peak_rss_mb(), rss_after_load_mb=rss_loaded)
    print(json.dumps(result))


def measure(pipeline: str, tokens: int, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", pipeline, "--model", args.model, "--tokens", str(tokens),
           "--max-length", str(args.max_length), "--batch-size", str(args.batch_size),
           "--sample-size", str(args.sample_size), "--seed", str(args.seed)]
    print(f"  running {pipeline} on {tokens} tokens …", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{pipeline} on {tokens} tokens failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="minilm")
    p.add_argument("--tokens", type=int, nargs="+", default=[16384, 65536])
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--sample-size", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/inspect")
    p.add_argument("--worker", choices=["ours", "reference"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    runs = {}
    for tokens in args.tokens:
        runs[tokens] = {name: measure(name, tokens, args) for name in ("ours", "reference")}

    from leanformer.files import save_json
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(args.out)
    lines = [f"# inspect vs reference pipeline — {args.model}", "",
             "One thread per process; each row is a fresh subprocess; seconds exclude model loading.", "",
             "| tokens | pipeline | seconds | peak RSS MB | RSS after load MB |", "|---|---|---|---|---|"]
    summary = {"model": args.model, "runs": {}}
    for tokens, pair in runs.items():
        for name, r in pair.items():
            lines.append(f"| {tokens} | {name} | {r['seconds']:.1f} | {r['peak_rss_mb']:.0f} | {r['rss_after_load_mb']:.0f} |")
        speedup = pair["reference"]["seconds"] / pair["ours"]["seconds"]
        max_diff = {}
        for kind, metrics in (("layers", REFERENCE_LAYER_METRICS), ("transitions", TRANSITION_METRICS)):
            for m in metrics:
                max_diff[m.name] = max(abs(a[m.name] - b[m.name])
                                       for a, b in zip(pair["ours"][kind], pair["reference"][kind]))
        summary["runs"][tokens] = {"speedup": speedup, "max_abs_diff": max_diff, **pair}
    lines += ["", "| tokens | speed-up (reference s / ours s) | peak RSS ours / reference |", "|---|---|---|"]
    for tokens, s in summary["runs"].items():
        lines.append(f"| {tokens} | {s['speedup']:.1f}× | {s['ours']['peak_rss_mb']:.0f} / {s['reference']['peak_rss_mb']:.0f} MB |")
    first = next(iter(summary["runs"].values()))
    lines += ["", f"## Metric values, {args.tokens[0]} tokens (ours / reference)", "",
              *markdown_header("block", TRANSITION_METRICS)]
    for a, b in zip(first["ours"]["transitions"], first["reference"]["transitions"]):
        lines.append(f"| {a['from']}→{a['to']} | " + " | ".join(
            f"{a[m.name]:.5f} / {b[m.name]:.5f}" for m in TRANSITION_METRICS) + " |")
    lines += ["", *markdown_header("layer", REFERENCE_LAYER_METRICS)]
    for a, b in zip(first["ours"]["layers"], first["reference"]["layers"]):
        lines.append(f"| {a['index']} | " + " | ".join(
            f"{a[m.name]:.5f} / {b[m.name]:.5f}" for m in REFERENCE_LAYER_METRICS) + " |")
    lines += ["", "Largest |ours − reference| per metric: " + ", ".join(
        f"{k} {v:.1e}" for k, v in first["max_abs_diff"].items())]
    out.mkdir(parents=True, exist_ok=True)
    save_json(out / "inspect_bench.json", summary)
    (out / "inspect_bench.md").write_text("\n".join(lines) + "\n")

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), dpi=110)
    toks = list(summary["runs"])
    for name, color in (("ours", "#3465a4"), ("reference", "#cc0000")):
        axes[0].plot(toks, [summary["runs"][t][name]["seconds"] for t in toks], "o-", color=color, label=name)
        axes[1].plot(toks, [summary["runs"][t][name]["peak_rss_mb"] for t in toks], "o-", color=color, label=name)
    axes[0].set(title="time (s, excl. model load)", xlabel="tokens")
    axes[1].set(title="peak RSS (MB)", xlabel="tokens")
    for ax in axes:
        ax.legend(), ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "inspect_bench.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

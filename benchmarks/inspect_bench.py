"""inspect vs a vectorised paper-faithful reference, and both vs the bare forward pass (the floor).

Three pipelines over the same tokens, the same windows and the same batches (length-grouped, longest
first, as `inspect` batches them), each in its own subprocess so its peak RSS is its own:
  ours       `lf.inspect` (streaming moments, a seeded token sample for TwoNN); the same process
             then times a bare forward pass over the same batches, so ours / floor is measured
             under the same load;
  floor      the bare forward pass alone (the base model under no_grad, no hooks): no inspection
             can be faster than reading every hidden state once;
  reference  what a careful engineer writes from the papers' definitions: keep every token's state
             (float32, one array per layer, freed once used), per layer one float64 SVD of the
             centred states giving anisotropy (σ₁²/Σσ²) and both linearity scores (the
             least-squares residual is the part of Ỹ outside span(U)), cosines in float64, and an
             exact vectorised TwoNN (float64 Gram-form distances in row blocks, two smallest per
             row) on the same sampled token positions with the same fit.
Every subprocess sets OMP/OPENBLAS/MKL/VECLIB/NUMEXPR threads and torch's threads to 1, so the
shared 2-core machine loads them alike; runs are interleaved (the order rotates each repeat) and
each figure is the median of --repeats runs. Seconds exclude model loading.

    flock /tmp/leanformer-bench.lock python benchmarks/inspect_bench.py [--model minilm]
        [--tokens 16384 65536] [--repeats 3] [--out results/inspect]

Writes inspect_bench.json (every run, raw), inspect_bench.md and inspect_bench.png from it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from provenance import git_state

ROOT = Path(__file__).resolve().parents[1]
PIPELINES = ("ours", "floor", "reference")
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS",
                    "NUMEXPR_NUM_THREADS")


def bench_texts() -> list[str]:
    from leanformer.paths import data_root
    from leanformer.text import default_corpus, read_text_files

    root = data_root()
    if root is None:
        return default_corpus()
    return read_text_files([root / "text" / "wikitext2.test.txt", root / "text" / "wikitext2.valid.txt"])


def grouped_batches(tokenizer, chunks, batch_size: int):
    """(batch, positions) in inspect's order: windows longest first, `batch_size` at a time;
    positions are each row's global token positions (for the TwoNN sample)."""
    import numpy as np

    from leanformer.text import pad_batch

    offsets = np.cumsum([0] + [len(c) for c in chunks])
    order = sorted(range(len(chunks)), key=lambda i: -len(chunks[i]))
    for start in range(0, len(order), batch_size):
        group = order[start:start + batch_size]
        yield (pad_batch(tokenizer, [chunks[i] for i in group]),
               np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in group]))


def bare_forward(model, tokenizer, chunks, batch_size: int) -> float:
    """Seconds of the base model's forward over every batch: nothing kept, no hooks."""
    import torch

    base = getattr(model, "base_model", model)
    started = time.perf_counter()
    with torch.no_grad():
        for batch, _ in grouped_batches(tokenizer, chunks, batch_size):
            base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return time.perf_counter() - started


def twonn_reference(X, keep: float, eps: float = 1e-7, block: int = 512) -> float:
    """Exact TwoNN as methods define it, vectorised: float64 distances to every point."""
    import numpy as np

    X = X.astype(np.float64)
    X = X - X.mean(0)
    X = X / np.linalg.norm(X, axis=1).mean()
    sq = (X * X).sum(1)
    r = np.empty((len(X), 2))
    for start in range(0, len(X), block):
        rows = np.arange(start, min(start + block, len(X)))
        d2 = sq[rows, None] + sq[None, :] - 2 * X[rows] @ X.T
        d2[np.arange(len(rows)), rows] = np.inf
        r[rows] = np.sqrt(np.maximum(np.sort(np.partition(d2, 1, axis=1)[:, :2], axis=1), 0))
    valid = r[:, 0] > eps
    mu = r[valid, 1] / r[valid, 0]
    mu = np.sort(mu[mu > 1 + eps])
    n_keep = int(len(mu) * keep)
    x = np.log(mu[:n_keep])
    y = -np.log(1 - np.arange(1, n_keep + 1) / len(mu))
    return float((x * y).sum() / (x * x).sum())


def reference_pipeline(model, tokenizer, chunks, batch_size: int, sample_size: int, seed: int, keep: float) -> dict:
    import numpy as np

    from leanformer.capture import capture
    from leanformer.metrics import sample_positions

    n = sum(len(c) for c in chunks)
    H, lasts, offset = None, [], 0
    for batch, _ in grouped_batches(tokenizer, chunks, batch_size):
        states, last, _ = capture(model, batch)
        if H is None:
            H = [np.empty((n, s.shape[1]), dtype=np.float32) for s in states]  # every token, every layer
        for buf, s in zip(H, states):
            buf[offset:offset + len(s)] = s.numpy()
        lasts.append(last.numpy() + offset)
        offset += len(states[0])
    last = np.concatenate(lasts)
    # The sample positions index tokens in inspect's batch order; rows here are in that order too.
    row_of_position = np.empty(n, dtype=np.int64)
    row_of_position[np.concatenate([p for _, p in grouped_batches(tokenizer, chunks, batch_size)])] = np.arange(n)
    sample_rows = row_of_position[sample_positions(n, sample_size, seed)]

    def centred(M):
        M = M.astype(np.float64)
        return M - M.mean(0)

    def cos_rows(X, Y):
        return (X * Y).sum(1) / (np.linalg.norm(X, axis=1) * np.linalg.norm(Y, axis=1))

    layers, transitions = [], []
    for i in range(len(H)):
        X = centred(H[i])
        U, S, _ = np.linalg.svd(X, full_matrices=False)
        layers.append({"index": i, "anisotropy": float(S[0] ** 2 / (S ** 2).sum()),
                       "intrinsic_dim": twonn_reference(H[i][sample_rows], keep)})
        if i + 1 < len(H):
            U = U[:, S > S[0] * 1e-7]  # guarded pseudo-inverse: the same rcond as ours
            Y = centred(H[i + 1])
            R = Y - X
            Yn, Rn = Y / np.linalg.norm(Y), R / np.linalg.norm(R)
            Xr, Yr = H[i].astype(np.float64), H[i + 1].astype(np.float64)
            transitions.append({
                "from": i, "to": i + 1,
                "linearity": float(np.linalg.norm(U.T @ Yn) ** 2),  # 1 − ‖Ỹ − UUᵀỸ‖²
                "linearity_wo_residual": float(np.linalg.norm(U.T @ Rn) ** 2),
                "block_influence": float(1 - cos_rows(Xr, Yr).mean()),
                "angular_distance": float((np.arccos(np.clip(cos_rows(Xr[last], Yr[last]), -1, 1)) / np.pi).mean())})
            del X, U, S, Y, R, Yn, Rn, Xr, Yr
        H[i] = None  # this layer's float32 storage is no longer needed
    return {"n_tokens": n, "layers": layers, "transitions": transitions}


def worker(args) -> None:
    """One measurement in a fresh process (thread variables already set by the parent): a JSON line."""
    import torch

    torch.set_num_threads(1)
    import leanformer as lf
    from leanformer.metrics.twonn import ID_ESTIMATORS
    from leanformer.runtime import peak_rss_mb
    from leanformer.text import token_chunks

    tokens = args.tokens[0]
    model, tokenizer = lf.load(args.model)
    texts = bench_texts()
    chunks = token_chunks(tokenizer, texts, max_length=args.max_length, tokens=tokens)
    rss_loaded = peak_rss_mb()
    result = {"pipeline": args.worker, "tokens": tokens}
    started = time.perf_counter()
    if args.worker == "ours":
        profile = lf.inspect(model, tokenizer, texts, tokens=tokens, max_seq_length=args.max_length,
                             batch_size=args.batch_size, sample_size=args.sample_size, seed=args.seed,
                             id_estimator=args.id_estimator, progress=False)
        result.update(seconds=time.perf_counter() - started, peak_rss_mb=peak_rss_mb(), n_tokens=profile.n_tokens,
                      layers=profile.layers, transitions=profile.transitions)
        result["floor_seconds_same_process"] = bare_forward(model, tokenizer, chunks, args.batch_size)
    elif args.worker == "floor":
        result.update(seconds=bare_forward(model, tokenizer, chunks, args.batch_size), peak_rss_mb=peak_rss_mb(),
                      n_tokens=sum(len(c) for c in chunks))
    else:
        result.update(reference_pipeline(model, tokenizer, chunks, args.batch_size, args.sample_size, args.seed,
                                         ID_ESTIMATORS[args.id_estimator]))
        result.update(seconds=time.perf_counter() - started, peak_rss_mb=peak_rss_mb())
    result["rss_after_load_mb"] = rss_loaded
    print(json.dumps(result))


def measure(pipeline: str, tokens: int, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", pipeline, "--model", args.model, "--tokens", str(tokens),
           "--max-length", str(args.max_length), "--batch-size", str(args.batch_size),
           "--sample-size", str(args.sample_size), "--seed", str(args.seed), "--id-estimator", args.id_estimator]
    env = {**os.environ, **{v: "1" for v in THREAD_VARIABLES}}
    print(f"  {pipeline} on {tokens} tokens …", end=" ", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"{pipeline} on {tokens} tokens failed:\n{proc.stderr[-3000:]}")
    run = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"{run['seconds']:.1f} s, peak RSS {run['peak_rss_mb']:.0f} MB", flush=True)
    return run


def summarise(runs: list[dict]) -> dict:
    """Medians per (tokens, pipeline), ours / floor ratios, memory growth and agreement, from raw runs."""
    from leanformer.metrics.schema import METRICS

    out: dict = {}
    for tokens in sorted({r["tokens"] for r in runs}):
        row = {}
        for name in PIPELINES:
            sub = [r for r in runs if r["tokens"] == tokens and r["pipeline"] == name]
            row[name] = {"seconds": statistics.median(r["seconds"] for r in sub),
                         "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in sub),
                         "rss_after_load_mb": statistics.median(r["rss_after_load_mb"] for r in sub), "runs": len(sub)}
        ours = [r for r in runs if r["tokens"] == tokens and r["pipeline"] == "ours"]
        ratios = [r["seconds"] / r["floor_seconds_same_process"] for r in ours]
        row["ours_over_floor_same_process"] = statistics.median(ratios)
        row["ours_over_floor_same_process_range"] = [min(ratios), max(ratios)]
        row["ours_peak_rss_range_mb"] = [min(r["peak_rss_mb"] for r in ours), max(r["peak_rss_mb"] for r in ours)]
        row["ours_over_floor_separate"] = row["ours"]["seconds"] / row["floor"]["seconds"]
        row["reference_over_ours"] = row["reference"]["seconds"] / row["ours"]["seconds"]
        ref = next(r for r in runs if r["tokens"] == tokens and r["pipeline"] == "reference")
        diffs = {}
        for kind in ("layers", "transitions"):
            for a, b in zip(ours[0][kind], ref[kind]):
                for key, value in b.items():
                    if key in METRICS and value is not None and a.get(key) is not None:
                        diffs[key] = max(diffs.get(key, 0.0), abs(a[key] - value))
        row["max_abs_diff_ours_vs_reference"] = diffs
        out[str(tokens)] = row
    sizes = sorted(out, key=int)
    out["ours_peak_rss_growth"] = out[sizes[-1]]["ours"]["peak_rss_mb"] / out[sizes[0]]["ours"]["peak_rss_mb"] - 1
    return out


def report(data: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = data["summary"]
    sizes = sorted((k for k in s if k.isdigit()), key=int)
    lines = [f"# inspect vs the vectorised reference and the bare forward pass — {data['model']}", "",
             f"commit {data['git']['commit'][:12]}{' (uncommitted changes)' if data['git']['dirty'] else ''}; "
             f"{data['repeats']} interleaved runs per cell, medians; one thread everywhere (torch and BLAS); "
             "seconds exclude model loading; each run a fresh subprocess.", "",
             "| tokens | pipeline | seconds | peak RSS MB | RSS after load MB |", "|---|---|---|---|---|"]
    for t in sizes:
        for name in PIPELINES:
            r = s[t][name]
            lines.append(f"| {t} | {name} | {r['seconds']:.2f} | {r['peak_rss_mb']:.0f} | {r['rss_after_load_mb']:.0f} |")
    lines += ["", "| tokens | ours / floor (same process) | ours / floor (separate runs) | reference / ours |",
              "|---|---|---|---|"]
    for t in sizes:
        lo, hi = s[t]["ours_over_floor_same_process_range"]
        lines.append(f"| {t} | {s[t]['ours_over_floor_same_process']:.2f}× (runs {lo:.2f}–{hi:.2f}) | "
                     f"{s[t]['ours_over_floor_separate']:.2f}× | {s[t]['reference_over_ours']:.2f}× |")
    lines += ["", f"Peak RSS of ours from {sizes[0]} to {sizes[-1]} tokens: {100 * s['ours_peak_rss_growth']:+.1f} % "
              "(medians; runs " + ", ".join(f"{t}: {s[t]['ours_peak_rss_range_mb'][0]:.0f}–{s[t]['ours_peak_rss_range_mb'][1]:.0f} MB"
                                            for t in sizes) + ").",
              "", "Largest |ours − reference| per metric: " + "; ".join(
                  f"{t} tokens: " + ", ".join(f"{k} {v:.1e}" for k, v in s[t]["max_abs_diff_ours_vs_reference"].items())
                  for t in sizes),
              "", "Ours also measures MLP sparsity (a hook on every MLP activation), which the reference does not."]
    (out / "inspect_bench.md").write_text("\n".join(lines) + "\n")

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), dpi=110)
    colors = {"ours": "#3465a4", "floor": "#4e9a06", "reference": "#cc0000"}
    for name in PIPELINES:
        runs = [r for r in data["runs"] if r["pipeline"] == name]
        for ax, key in zip(axes, ("seconds", "peak_rss_mb")):
            ax.scatter([r["tokens"] for r in runs], [r[key] for r in runs], color=colors[name], alpha=0.35, s=14)
            ax.plot([int(t) for t in sizes], [s[t][name][key] for t in sizes], "o-", color=colors[name], label=name)
    axes[0].set(title="time (s, excl. model load; dots = runs, line = median)", xlabel="tokens")
    axes[1].set(title="peak RSS (MB)", xlabel="tokens")
    for ax in axes:
        ax.legend(), ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "inspect_bench.png")
    plt.close(fig)
    print("\n".join(lines))


def main() -> None:
    from leanformer.inspection import InspectConfig
    from leanformer.metrics.twonn import ID_ESTIMATORS

    p = argparse.ArgumentParser()
    p.add_argument("--model", default="minilm")
    p.add_argument("--tokens", type=int, nargs="+", default=[16384, 65536])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=InspectConfig().batch_size)
    p.add_argument("--sample-size", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--id-estimator", default="twonn-skdim", choices=list(ID_ESTIMATORS))
    p.add_argument("--out", default="results/inspect")
    p.add_argument("--report-only", action="store_true", help="rewrite the .md and .png from the saved .json")
    p.add_argument("--worker", choices=PIPELINES, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    out = Path(args.out)
    if args.report_only:  # the summary too is recomputed from the raw runs
        data = json.loads((out / "inspect_bench.json").read_text())
        data["summary"] = summarise(data["runs"])
        from leanformer.files import save_json

        save_json(out / "inspect_bench.json", data)
        return report(data, out)

    runs = []
    for repeat in range(args.repeats):
        for tokens in args.tokens:
            order = PIPELINES[repeat % 3:] + PIPELINES[:repeat % 3]  # rotate, so no pipeline always runs first
            print(f"repeat {repeat + 1}/{args.repeats}, {tokens} tokens", flush=True)
            for name in order:
                runs.append({**measure(name, tokens, args), "repeat": repeat})
    from leanformer.files import save_json

    data = {"model": args.model, "git": git_state(), "repeats": args.repeats,
            "settings": {k: getattr(args, k) for k in ("max_length", "batch_size", "sample_size", "seed", "id_estimator")},
            "threads": {v: "1" for v in THREAD_VARIABLES} | {"torch": 1}, "runs": runs}
    data["summary"] = summarise(runs)
    out.mkdir(parents=True, exist_ok=True)
    save_json(out / "inspect_bench.json", data)
    report(data, out)


if __name__ == "__main__":
    main()

"""Layer pruning: for every single block and every run of two blocks, the actual damage of dropping it
and of replacing it by a fitted linear map, against each criterion's score (ShortGPT, Gromov et al. 2024, Secretly Linear, ReplaceMe).

  stories260K  quality = perplexity on held-out TinyStories text (damage = Δ NLL, nats/token)
  minilm       quality = cosine of mean-pooled sentence embeddings to the unpruned model on SST-2 dev
               sentences (damage = 1 − cosine); calibration on SST-2 train sentences

Criteria are computed once per model on calibration text from the unpruned model; "damage-predicting"
direction: −linearity, +block influence, +angular distance. Spearman ρ > 0 = the criterion ranks well.

    .venv/bin/python benchmarks/prune_bench.py        # → results/prune/{results.json,results.md,*.png}
    .venv/bin/python benchmarks/prune_bench.py --heal 60   # only: LoRA healing on stories260K → heal.{json,md}

torch runs with 1 thread (shared machine) so numbers are comparable between runs.
"""
from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parents[1] / "results" / "prune"
CRITERIA = ("linearity", "block_influence", "angular")


def paragraphs(path: Path) -> list[str]:
    return [p.strip() for p in re.split(r"\n\s*\n", path.read_text(encoding="utf-8")) if p.strip()]


def setup_stories(root: Path, eval_tokens: int):
    import leanformer as lf

    model, tok = lf.load("stories260k")
    paras = paragraphs(root / "text/tinystories.valid.txt")
    cut = len(paras) // 2  # calibration from the first half, evaluation from the second: disjoint text
    calib_texts = ["\n".join(paras[i:i + 8]) for i in range(0, cut, 8)]
    held = "\n".join(paras[cut:])
    ids = tok(held)["input_ids"][:eval_tokens]
    held = tok.decode(ids, skip_special_tokens=True)

    def quality(m):
        return lf.perplexity(m, tok, [held], max_length=512, stride=512)["nll_per_token"]

    return model, tok, calib_texts, quality, "held-out TinyStories NLL (nats/token)"


def setup_minilm(root: Path, n_sentences: int):
    import leanformer as lf
    from leanformer.tasks import load_task
    from leanformer.evaluation import sentence_embeddings

    model, tok = lf.load("minilm")
    task = load_task(str(root / "glue/SST-2"))
    calib_texts = list(task.train.text_a[:4000])
    held = list(task.dev.text_a[:n_sentences])
    base = sentence_embeddings(model, tok, held)

    def quality(m):
        e = sentence_embeddings(m, tok, held)
        return float(torch.nn.functional.cosine_similarity(e, base, dim=1).mean())

    return model, tok, calib_texts, quality, "mean cosine of sentence embeddings to the unpruned model (SST-2 dev)"


def spearman(a, b) -> float:
    from scipy.stats import spearmanr

    if len(a) < 3:
        return float("nan")
    return float(spearmanr(a, b)[0])


def bench_model(name, setup, tokens):
    from leanformer.capture import find_blocks
    from leanformer.compress.prune import DAMAGE_SIGN, calibrate, pruned_copy, score_runs

    model, tok, calib_texts, quality, qdesc = setup()
    higher_better = name == "minilm"
    t0 = time.perf_counter()
    calib = calibrate(model, tok, calib_texts, tokens=tokens, max_length=128 if name == "minilm" else 256)
    base_q = quality(model)
    L = len(find_blocks(model)[0])
    rows = []
    for n in (1, 2):
        scores = score_runs(calib, n)
        for s in range(L - n + 1):
            row = {"n": n, "start": s, "blocks": list(range(s, s + n)), **{c: scores[c][s] for c in CRITERIA}}
            for rep in ("none", "linear"):
                q = quality(pruned_copy(model, n, s, rep, calib))
                row[f"quality_{rep}"] = q
                row[f"damage_{rep}"] = (base_q - q) if higher_better else (q - base_q)
            rows.append(row)
            print(f"{name} n={n} start={s}: drop {row['quality_none']:.4f}  linear {row['quality_linear']:.4f}  "
                  + "  ".join(f"{c}={row[c]:.4f}" for c in CRITERIA), flush=True)
    summary = {"base_quality": base_q, "quality": qdesc, "higher_is_better": higher_better, "n_layers": L,
               "calibration_tokens": calib.n_tokens, "seconds": time.perf_counter() - t0,
               "spearman": {}, "best": {}, "chosen": {}}
    for n in (1, 2):
        sub = [r for r in rows if r["n"] == n]
        for rep in ("none", "linear"):
            dmg = [r[f"damage_{rep}"] for r in sub]
            summary["spearman"][f"n{n}_{rep}"] = {c: spearman([DAMAGE_SIGN[c] * r[c] for r in sub], dmg) for c in CRITERIA}
            best = min(sub, key=lambda r: r[f"damage_{rep}"])
            summary["best"][f"n{n}_{rep}"] = {"blocks": best["blocks"], "quality": best[f"quality_{rep}"],
                                              "damage": best[f"damage_{rep}"]}
            chosen = {}
            for c in CRITERIA:
                pick = min(sub, key=lambda r: DAMAGE_SIGN[c] * r[c])
                chosen[c] = {"blocks": pick["blocks"], "quality": pick[f"quality_{rep}"], "damage": pick[f"damage_{rep}"]}
            idx = [r for r in sub if r["start"] == L - n - 1][0]  # the 'index' default: the n blocks before the last
            chosen["index"] = {"blocks": idx["blocks"], "quality": idx[f"quality_{rep}"], "damage": idx[f"damage_{rep}"]}
            summary["chosen"][f"n{n}_{rep}"] = chosen
    return rows, summary


def write_report(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from leanformer.files import atomic_write_bytes, save_json

    save_json(OUT / "results.json", results)
    md = ["# Layer pruning: damage vs criteria (stories260K, minilm)", "",
          f"{results['env']}", ""]
    for name, res in results["models"].items():
        s = res["summary"]
        md += [f"## {name}", "", f"Quality: {s['quality']}; unpruned = {s['base_quality']:.4f}; {s['n_layers']} blocks; "
               f"{s['calibration_tokens']} calibration tokens.", "",
               "| n | blocks | quality (drop) | quality (linear) | linearity | block influence | angular |",
               "|---|---|---|---|---|---|---|"]
        for r in res["rows"]:
            md.append(f"| {r['n']} | {r['blocks']} | {r['quality_none']:.4f} | {r['quality_linear']:.4f} | "
                      f"{r['linearity']:.4f} | {r['block_influence']:.4f} | {r['angular']:.4f} |")
        md += ["", "Spearman ρ(criterion's predicted damage, actual damage) — higher is better:", "",
               "| runs | replacement | linearity | block influence | angular |", "|---|---|---|---|---|"]
        for key, rho in s["spearman"].items():
            n, rep = key.split("_")
            md.append(f"| {n[1:]} block(s) | {'drop' if rep == 'none' else 'linear'} | "
                      + " | ".join(f"{rho[c]:+.2f}" for c in CRITERIA) + " |")
        md += ["", "Quality of the run each criterion picks, and the best achievable (oracle):", "",
               "| n | replacement | linearity | block influence | angular | index (before last) | best |",
               "|---|---|---|---|---|---|---|"]
        for key, ch in s["chosen"].items():
            n, rep = key.split("_")
            b = s["best"][key]
            md.append(f"| {n[1:]} | {'drop' if rep == 'none' else 'linear'} | "
                      + " | ".join(f"{ch[c]['quality']:.4f} {ch[c]['blocks']}" for c in (*CRITERIA, "index"))
                      + f" | {b['quality']:.4f} {b['blocks']} |")
        md.append("")
    atomic_write_bytes(OUT / "results.md", ("\n".join(md) + "\n").encode())

    names = list(results["models"])
    fig, axes = plt.subplots(len(names), 3, figsize=(16, 4.2 * len(names)), squeeze=False)
    for row_axes, name in zip(axes, names):
        res = results["models"][name]
        for ax, n in zip(row_axes[:2], (1, 2)):
            sub = [r for r in res["rows"] if r["n"] == n]
            x = [str(r["blocks"]) for r in sub]
            ax.plot(x, [r["quality_none"] for r in sub], "o-", label="drop")
            ax.plot(x, [r["quality_linear"] for r in sub], "s-", label="linear replacement")
            ax.axhline(res["summary"]["base_quality"], color="gray", ls=":", label="unpruned")
            ax.set_title(f"{name}: remove {n} block(s)")
            ax.set_ylabel("NLL (lower better)" if name == "stories260k" else "embedding cosine (higher better)")
            ax.legend()
            ax.grid(alpha=0.3)
        ax = row_axes[2]
        for c, m in zip(CRITERIA, "o^s"):
            sign = {"linearity": -1, "block_influence": 1, "angular": 1}[c]
            pts = [(sign * r[c], r["damage_none"]) for r in res["rows"]]
            lo, hi = min(p[0] for p in pts), max(p[0] for p in pts)
            ax.scatter([(p[0] - lo) / (hi - lo + 1e-12) for p in pts], [p[1] for p in pts], marker=m, label=c)
        ax.set_xlabel("predicted damage (criterion, min-max scaled)")
        ax.set_ylabel("actual damage (drop)")
        ax.set_title(f"{name}: criteria vs damage (n = 1, 2)")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(OUT / "damage.png", dpi=110)
    print("\n".join(md))


def heal_bench(root: Path, steps: int, tokens: int, eval_tokens: int) -> None:
    """stories260K: the runs the linearity criterion picks (n = 1, 2), dropped or linearly replaced,
    before and after a short LoRA heal on the calibration text."""
    from leanformer.compress.prune import calibrate, pruned_copy, score_runs
    from leanformer.train.heal import heal
    from leanformer.files import atomic_write_bytes, save_json

    model, tok, calib_texts, quality, qdesc = setup_stories(root, eval_tokens)
    calib = calibrate(model, tok, calib_texts, tokens=tokens, max_length=256)
    base = quality(model)
    rows = []
    for n in (1, 2):
        s = score_runs(calib, n)["linearity"]
        start = max(range(len(s)), key=s.__getitem__)
        for rep in ("none", "linear"):
            m = pruned_copy(model, n, start, rep, calib)
            before = quality(m)
            t0 = time.perf_counter()
            info = heal(m, tok, calib_texts, steps=steps, rank=8, learning_rate=1e-3, batch_size=8, max_length=256)
            rows.append({"n": n, "blocks": list(range(start, start + n)), "replace": rep, "before": before,
                         "after": quality(m), "heal_seconds": time.perf_counter() - t0, **info})
            print(rows[-1], flush=True)
    save_json(OUT / "heal.json", {"base_quality": base, "quality": qdesc, "steps": steps, "rows": rows})
    md = [f"# Healing after pruning (stories260K, {steps} LoRA steps, rank 8, lr 1e-3, batch 8 × 256 tokens)", "",
          f"Quality: {qdesc}; unpruned = {base:.4f}. Runs chosen by the linearity criterion.", "",
          "| n | blocks | replacement | before heal | after heal |", "|---|---|---|---|---|"]
    md += [f"| {r['n']} | {r['blocks']} | {'drop' if r['replace'] == 'none' else 'linear'} | {r['before']:.4f} | {r['after']:.4f} |"
           for r in rows]
    atomic_write_bytes(OUT / "heal.md", ("\n".join(md) + "\n").encode())
    print("\n".join(md))


def main() -> None:
    from leanformer.paths import data_root

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=8192, help="calibration tokens per model")
    p.add_argument("--eval-tokens", type=int, default=32768, help="held-out TinyStories tokens for perplexity")
    p.add_argument("--sentences", type=int, default=872, help="SST-2 dev sentences for minilm")
    p.add_argument("--heal", type=int, default=0, metavar="STEPS", help="run only the healing experiment")
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    root = data_root(required=True)
    if args.heal:
        OUT.mkdir(parents=True, exist_ok=True)
        heal_bench(root, args.heal, args.tokens, args.eval_tokens)
        return
    results = {"env": f"torch {torch.__version__}, {torch.get_num_threads()} thread, CPU; calibration {args.tokens} "
                      f"tokens; stories eval {args.eval_tokens} tokens; minilm eval {args.sentences} sentences",
               "models": {}}
    for name, setup in (("stories260k", lambda: setup_stories(root, args.eval_tokens)),
                        ("minilm", lambda: setup_minilm(root, args.sentences))):
        rows, summary = bench_model(name, setup, args.tokens)
        results["models"][name] = {"rows": rows, "summary": summary}
    OUT.mkdir(parents=True, exist_ok=True)
    write_report(results)


if __name__ == "__main__":
    main()

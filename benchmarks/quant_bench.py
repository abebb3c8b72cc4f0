"""Kashin vs RTN vs HQQ at matched honest bits per weight, on minilm and stories260K.

For every configuration (≈3 and ≈4 bits per weight, plus each method's usual group sizes):
  minilm       relative weight error per layer; cosine between original and quantized mean-pooled
               sentence embeddings on SST-2 sentences; SST-2 dev accuracy of a fine-tuned minilm
               classifier before and after quantization; quantization wall time; on-disk size
  stories260K  TinyStories validation perplexity; on-disk size
Bits per weight are honest: lf.size_report counts every stored byte (indices, codebooks, scales,
zeros, step sizes, domain bits, seeds) of the quantized Linear layers.

  .venv/bin/python benchmarks/quant_bench.py            # writes results/quant/{results.json,results.md,*.png}

One thread (torch.set_num_threads(1)) so timings compare fairly on a shared machine. The fine-tuned
SST-2 classifier is cached under --cache (full fine-tune, fixed seed) and reused by later runs.
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

import leanformer as lf
from leanformer.compress import relative_weight_errors
from leanformer.paths import data_root
from leanformer.tasks import load_task
from leanformer.text import read_text_files
from leanformer.files import save_json

ROOT = Path(__file__).resolve().parents[1]


def configs():
    """(label, family, config factory). Family pairs configs of about the same honest bits."""
    K, R, H = lf.Kashin, lf.RTN, lf.HQQ
    return [
        # ≈3 bits per weight
        ("kashin-3", "3", lambda: K(bits=3, cache=True)),
        ("kashin-3-shared", "3", lambda: K(bits=3, step_sizes="shared", cache=True)),
        ("rtn-3-row", "3", lambda: R(bits=3, group_size=None, cache=True)),
        ("hqq-3-row", "3", lambda: H(bits=3, group_size=None, cache=True)),
        ("rtn-3-g128", "3+", lambda: R(bits=3, group_size=128, cache=True)),
        ("hqq-3-g64", "3+", lambda: H(bits=3, group_size=64, cache=True)),
        # ≈4 bits per weight
        ("kashin-4", "4", lambda: K(bits=4, cache=True)),
        ("kashin-4-shared", "4", lambda: K(bits=4, step_sizes="shared", cache=True)),
        ("rtn-4-row", "4", lambda: R(bits=4, group_size=None, cache=True)),
        ("hqq-4-row", "4", lambda: H(bits=4, group_size=None, cache=True)),
        ("rtn-3-g32", "4", lambda: R(bits=3, group_size=32, cache=True)),
        ("hqq-3-g32", "4", lambda: H(bits=3, group_size=32, cache=True)),
        # usual configurations (≈4.25–5 bits)
        ("rtn-4-g128", "4+", lambda: R(bits=4, group_size=128, cache=True)),
        ("kashin-4-g128", "4+", lambda: K(bits=4, group_size=128, cache=True)),
        ("hqq-4-g64", "4+", lambda: H(bits=4, group_size=64, cache=True)),
        ("rtn-4-g32", "4+", lambda: R(bits=4, group_size=32, cache=True)),
        ("hqq-4-g32", "4+", lambda: H(bits=4, group_size=32, cache=True)),
        # the reference (unstructured) Kashin variants, for comparison
        ("kashin-4-kmeans", "ref", lambda: K(bits=4, codebook="kmeans", cache=True)),
        ("kashin-4-matrix", "ref", lambda: K(bits=4, codebook="kmeans", form="matrix", transform="random", cache=True)),
    ]


def dir_bytes(path: Path) -> dict:
    weights = sum(p.stat().st_size for p in path.glob("*.safetensors"))
    total = sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    return {"safetensors_bytes": weights, "dir_bytes": total}


def finetuned_minilm(cache: Path, task, steps: int, seed: int):
    """Full fine-tune of minilm on SST-2 (batch 32, length 64), cached as an HF directory."""
    import tempfile

    from transformers import TrainingArguments

    out = cache / f"minilm-sst2-full-{steps}steps-seed{seed}"
    if (out / "config.json").is_file():
        model, tok = lf.load(out)
        return model, tok, json.loads((out / "train_metrics.json").read_text())
    model, tok = lf.load("minilm", head="sequence-classification", num_labels=2)
    model.train()
    with tempfile.TemporaryDirectory() as scratch:
        training = TrainingArguments(output_dir=scratch, learning_rate=5e-5, max_steps=steps, per_device_train_batch_size=32,
                                     warmup_steps=0.06, seed=seed, optim="adamw_torch",
                                     train_sampling_strategy="group_by_length", save_strategy="no", report_to="none",
                                     disable_tqdm=True, use_cpu=True)
        metrics = lf.finetune(model, tok, task, training, method="full", max_seq_length=64, evaluate=False)
    model.eval()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    save_json(out / "train_metrics.json", metrics)
    model, tok = lf.load(out)
    return model, tok, metrics


def quantize_grouped(model, make):
    """Quantize with the config's group size where it divides a layer's width and per row where it
    does not (stories260K's down_proj is 172 wide = 4·43, which no usual group size divides)."""
    from leanformer.targets import select_linear

    cfg = make()
    g = getattr(cfg, "group_size", None)
    names = select_linear(model, cfg.targets)
    odd = [n for n in names if g is not None and model.get_submodule(n).in_features % g]
    if not odd:
        return lf.quantize(model, cfg, progress=False)
    rest = make()
    rest.group_size, rest.targets = None, odd
    if len(odd) == len(names):  # the group is wider than every layer: per row throughout
        return lf.quantize(model, rest, progress=False)
    cfg.targets = [n for n in names if n not in odd]
    rep = lf.quantize(model, cfg, progress=False)
    rep2 = lf.quantize(model, rest, progress=False)
    rep.quantized += rep2.quantized
    rep.skipped.update(rep2.skipped)
    rep.seconds += rep2.seconds
    return rep


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "results" / "quant"))
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "leanformer-quant-bench"))
    ap.add_argument("--sentences", type=int, default=2000, help="SST-2 train sentences for the embedding cosine")
    ap.add_argument("--finetune-steps", type=int, default=200)
    ap.add_argument("--stories", type=int, default=400, help="TinyStories validation stories for perplexity")
    ap.add_argument("--only", nargs="*", help="run only these config labels")
    ap.add_argument("--append", action="store_true",
                    help="merge these rows into an existing --out/results.json (same setup) instead of replacing it")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    root = data_root(required=True)
    out, cache = Path(args.out), Path(args.cache)
    out.mkdir(parents=True, exist_ok=True)
    cache.mkdir(parents=True, exist_ok=True)

    sst2 = load_task(str(root / "glue" / "SST-2"))
    with open(root / "glue" / "SST-2" / "train.tsv", encoding="utf-8") as f:
        sentences = [r[0] for r in list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:args.sentences + 1]]
    stories = read_text_files([root / "text" / "tinystories.valid.txt"])[: args.stories]

    base, tok = lf.load("minilm")
    ref_emb = lf.sentence_embeddings(base, tok, sentences, max_length=64)
    clf, clf_tok, train_metrics = finetuned_minilm(cache, sst2, args.finetune_steps, args.seed)
    clf_fp = lf.evaluate_task(clf, clf_tok, sst2, max_length=64)
    llama, ltok = lf.load("stories260k")
    ppl_fp = lf.perplexity(llama, ltok, stories, max_length=256)
    print(f"full precision: SST-2 dev {clf_fp}, TinyStories {ppl_fp}")

    # full-precision on-disk sizes for reference (safetensors of the fp32 weights)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        base.save_pretrained(Path(tmp) / "b")
        llama.save_pretrained(Path(tmp) / "l")
        fp_disk = {"minilm": (Path(tmp) / "b" / "model.safetensors").stat().st_size,
                   "stories260k": (Path(tmp) / "l" / "model.safetensors").stat().st_size}

    setup = {"torch_threads": 1, "torch": torch.__version__, "machine": platform.machine(),
             "processor": platform.processor(), "sentences": len(sentences), "stories": len(stories),
             "stories_tokens": ppl_fp["n_tokens"], "finetune": {"steps": args.finetune_steps, "batch": 32,
             "max_seq_length": 64, "learning_rate": 5e-5, "seed": args.seed,
             "train_seconds_per_step": train_metrics.get("train_seconds_per_step")},
             "command": "python benchmarks/quant_bench.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    full_precision = {"sst2_dev": clf_fp, "tinystories": ppl_fp, "disk_bytes": fp_disk}
    rows = []
    for label, family, make in configs():
        if args.only and label not in args.only:
            continue
        row = {"config": label, "family": family, "settings": make().to_dict()}
        # minilm encoder: weight error, embeddings, size, time
        q = copy.deepcopy(base)
        t0 = time.perf_counter()
        rep = lf.quantize(q, make(), progress=False)
        row["minilm_quantize_seconds"] = time.perf_counter() - t0
        row["minilm_skipped"] = rep.skipped
        sizes = lf.size_report(q)
        row["minilm_bits_per_weight"] = sizes.total["bits_per_weight"]
        errs = relative_weight_errors(base, q)
        row["minilm_weight_error_per_layer"] = errs
        row["minilm_weight_error_mean"] = sum(errs.values()) / len(errs)
        emb = lf.sentence_embeddings(q, tok, sentences, max_length=64)
        cos = torch.nn.functional.cosine_similarity(emb, ref_emb, dim=1)
        row["minilm_embedding_cosine"] = float(cos.mean())
        row["minilm_embedding_cosine_min"] = float(cos.min())
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            lf.save(q, tok, Path(tmp) / "q")
            row["minilm_disk"] = dir_bytes(Path(tmp) / "q")
        del q
        # fine-tuned classifier (same targets: the encoder's Linear layers; head and pooler stay fp32)
        qc = copy.deepcopy(clf)
        lf.quantize(qc, make(), progress=False)
        row["sst2_dev"] = lf.evaluate_task(qc, clf_tok, sst2, max_length=64)
        del qc
        # stories260K
        ql = copy.deepcopy(llama)
        t0 = time.perf_counter()
        rep = quantize_grouped(ql, make)
        row["stories_quantize_seconds"] = time.perf_counter() - t0
        row["stories_skipped"] = rep.skipped
        row["stories_bits_per_weight"] = lf.size_report(ql).total["bits_per_weight"]
        row["stories_weight_error_mean"] = sum(relative_weight_errors(llama, ql).values()) / len(rep.quantized)
        row["tinystories"] = lf.perplexity(ql, ltok, stories, max_length=256)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            lf.save(ql, ltok, Path(tmp) / "q")
            row["stories_disk"] = dir_bytes(Path(tmp) / "q")
        del ql
        rows.append(row)
        write(out, setup, full_precision, rows, args.append)
        print(f"{label:>16}: minilm {row['minilm_bits_per_weight']:.3f} b/w cos {row['minilm_embedding_cosine']:.4f} "
              f"acc {row['sst2_dev']['accuracy']:.4f} ({row['minilm_quantize_seconds']:.1f} s) | stories "
              f"{row['stories_bits_per_weight']:.3f} b/w ppl {row['tinystories']['perplexity']:.4f}", flush=True)

    write(out, setup, full_precision, rows, args.append)
    print((out / "results.md").read_text())


def write(out: Path, setup: dict, full_precision: dict, rows: list, append: bool) -> None:
    """results.json / results.md / plots, rewritten after every configuration (a crash keeps the rows);
    with --append, rows of an earlier run on the same setup are kept unless re-measured."""
    result = {"setup": dict(setup), "full_precision": full_precision, "rows": list(rows)}
    if append and (out / "results.json").is_file():
        old = json.loads((out / "results.json").read_text())
        if old["full_precision"] != full_precision:
            raise SystemExit("--append: the existing results were measured on a different setup; rerun all")
        order = [label for label, _, _ in configs()]
        merged = {r["config"]: r for r in old["rows"]} | {r["config"]: r for r in rows}
        result["rows"] = sorted(merged.values(), key=lambda r: order.index(r["config"]))
        if setup["command"] not in old["setup"]["command"]:
            result["setup"]["command"] = old["setup"]["command"] + " ; " + setup["command"]
    save_json(out / "results.json", result)
    (out / "results.md").write_text(markdown(result))
    plots(result, out)


def markdown(res) -> str:
    fp = res["full_precision"]
    lines = [
        "# Quantization: Kashin vs RTN vs HQQ at honest bits per weight",
        "",
        f"minilm: {res['setup']['sentences']} SST-2 sentences for the embedding cosine; fine-tuned classifier "
        f"(full fine-tune, {res['setup']['finetune']['steps']} steps) full-precision SST-2 dev accuracy "
        f"{fp['sst2_dev']['accuracy']:.4f}. stories260K: {res['setup']['stories']} TinyStories validation stories "
        f"({fp['tinystories']['n_tokens']} tokens), full-precision perplexity {fp['tinystories']['perplexity']:.4f}. "
        f"fp32 safetensors: minilm {fp['disk_bytes']['minilm'] / 2**20:.2f} MiB, stories260K "
        f"{fp['disk_bytes']['stories260k'] / 2**10:.0f} KiB. One torch thread.",
        "",
        "Bits/w = every stored byte of the quantized Linear layers (indices, codebooks, scales, zeros, step sizes, "
        "domain bits, seeds, column scales) per weight. Embeddings, norms, biases and heads stay fp32 (counted in the "
        "on-disk size). stories260K's down_proj (172 wide) is quantized per row where a group size does not divide it.",
        "",
        "| config | bits class | minilm bits/w | weight err | emb. cosine (min) | SST-2 acc | quantize s | disk MiB "
        "| stories bits/w | TinyStories ppl | disk KiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        lines.append(
            f"| {r['config']} | {r['family']} | {r['minilm_bits_per_weight']:.3f} | {r['minilm_weight_error_mean']:.4f} | "
            f"{r['minilm_embedding_cosine']:.4f} ({r['minilm_embedding_cosine_min']:.3f}) | {r['sst2_dev']['accuracy']:.4f} | "
            f"{r['minilm_quantize_seconds']:.1f} | {r['minilm_disk']['safetensors_bytes'] / 2**20:.2f} | "
            f"{r['stories_bits_per_weight']:.3f} | {r['tinystories']['perplexity']:.4f} | "
            f"{r['stories_disk']['safetensors_bytes'] / 2**10:.0f} |")
    skipped = [(r["config"], k, v) for r in res["rows"] for k, v in {**r["minilm_skipped"], **r["stories_skipped"]}.items()]
    lines += ["", "Layers kept in full precision (did not converge): " + (
        "; ".join(f"{c}: {k} ({v})" for c, k, v in skipped) if skipped else "none.")]
    return "\n".join(lines) + "\n"


def plots(res, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"kashin": "tab:red", "rtn": "tab:blue", "hqq": "tab:green"}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for r in res["rows"]:
        c = colors[r["settings"]["method"]]
        axes[0].scatter(r["minilm_bits_per_weight"], 1 - r["minilm_embedding_cosine"], color=c)
        axes[0].annotate(r["config"], (r["minilm_bits_per_weight"], 1 - r["minilm_embedding_cosine"]), fontsize=6)
        axes[1].scatter(r["minilm_bits_per_weight"], r["sst2_dev"]["accuracy"], color=c)
        axes[1].annotate(r["config"], (r["minilm_bits_per_weight"], r["sst2_dev"]["accuracy"]), fontsize=6)
        axes[2].scatter(r["stories_bits_per_weight"], r["tinystories"]["perplexity"], color=c)
        axes[2].annotate(r["config"], (r["stories_bits_per_weight"], r["tinystories"]["perplexity"]), fontsize=6)
    fp = res["full_precision"]
    axes[1].axhline(fp["sst2_dev"]["accuracy"], color="k", lw=0.8, ls="--", label="fp32")
    axes[2].axhline(fp["tinystories"]["perplexity"], color="k", lw=0.8, ls="--", label="fp32")
    axes[0].set(xlabel="honest bits / weight", ylabel="1 − embedding cosine", yscale="log", title="minilm embeddings")
    axes[1].set(xlabel="honest bits / weight", ylabel="SST-2 dev accuracy", title="fine-tuned minilm")
    axes[2].set(xlabel="honest bits / weight", ylabel="perplexity", yscale="log", title="stories260K TinyStories")
    for ax in axes:
        ax.grid(alpha=0.3)
    for m, c in colors.items():
        axes[0].scatter([], [], color=c, label=m)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out / "quality_vs_bits.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(12, 4))
    for r in res["rows"]:
        if r["family"] != "4":
            continue
        errs = r["minilm_weight_error_per_layer"]
        ax.plot(range(len(errs)), list(errs.values()), marker=".", label=f"{r['config']} ({r['minilm_bits_per_weight']:.2f} b/w)")
    names = list(res["rows"][0]["minilm_weight_error_per_layer"])
    ax.set_xticks(range(len(names)), [n.replace("encoder.layer.", "L").replace("attention.", "").replace("self.", "")
                                      for n in names], rotation=90, fontsize=6)
    ax.set(ylabel="‖W − Ŵ‖ / ‖W‖", title="minilm relative weight error per layer, ≈4 bits per weight")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "weight_error_per_layer.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()

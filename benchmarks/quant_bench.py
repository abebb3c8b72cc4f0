"""Quantization on the CPU: quality against honest bits per weight (Pareto curves) and a latency table.

Models and quality (each with a 95 % bootstrap interval, and one for the paired difference from fp32)
  minilm       the fine-tuned SST-2 classifier (full fine-tune, cached under --cache): dev accuracy from
               per-example predictions (a fixed random sample of --sst2-dev dev examples, the same for
               every config); and the mean cosine between the quantized and fp32 mean-pooled sentence
               embeddings (last hidden state, sentence-transformers' pooling) of --sentences held-out SST-2
               *training* sentences. --embeddings picks whose embeddings: "classifier" (default: its
               encoder, so one quantization per config serves both metrics) or "base" (the
               sentence-transformers minilm, quantized separately: about twice the quantization time).
  stories260K  perplexity on --windows fixed, non-overlapping windows of --window tokens of held-out
               TinyStories validation text (each window scored on its own; the interval resamples windows).
  Calibration (lf.plan and GPTQ) never overlaps an evaluation set: SST-2 training sentences after the
  embedding sentences; TinyStories validation stories from the end of the file, the windows from its start.
x = honest bits per weight: lf.size_report's total over the quantized Linear layers (every stored byte).

Configurations: RTN, HQQ and GPTQ at 2/3/4 bits × group 32/64/128/192/per row (a group that divides no layer
of a model is skipped there; layers it does not divide are quantized per row, listed in the row); RTN and
GPTQ at group 64 and per row with compact, searched grids (-compact: lf.plan's GPTQ candidates);
column scaling (col_scale=True) on RTN/HQQ at groups 64 and per row; Kashin at 2/3/4 bits with and
without column scaling, vectors spanning two rows, the per-layer layout choice; KashinGPTQ (Kashin's
closed codebook on W's columns inside GPTQ's compensation, calibrated as GPTQ is) at 2/3/4 bits; lf.plan at 2.5/3.0/3.5
bits (its defaults) and with the block-influence profile (use_profile=True, the ablation), and lf.plan at
uniform Kashin-3's honest bits/weight. Families missing from this version of the library
are listed as skipped, with the reason, never measured.

Latency (one torch thread; OMP/MKL/OpenBLAS pinned to one thread before torch loads), for fp32 and a
representative subset saved with lf.save and reloaded in a fresh child process:
  batch 1   stories260K greedy generation of --new-tokens tokens from a fixed prompt (model.generate,
            use_cache=True), tokens/s, median of --repeats runs
  batch 32  minilm classifier forward over the same --latency-batches SST-2 dev batches, ms per batch
  batch 1   minilm: the first --single-sentences of those sentences one per forward, unpadded, ms per sentence
  Each quantized model is timed three ways: default (kernel="native", the fused C++ kernels), decode (every
  weight rebuilt with plain torch ops on every forward) and cache (rebuilt once and kept).
  paired    the default forward and fp32 timed alternately in the same process (who goes first alternating),
            --decoder-pairs rounds for stories260K and --repeats for minilm; the targets read the median of the
            per-round ratios. fp32's own child times a second fp32 copy the same way: the A/A control.
  memory    the child's peak RSS (ru_maxrss) after lf.load, after the timed default forwards, and after
            the cache=True forwards, each minus its RSS after importing torch and leanformer; beside the
            saved directory's size on disk
Each finished row (quality per model and config, latency per model and config) is appended to
--cache/rows.jsonl and not measured again on a rerun with the same settings; results.json, results.md
and the plots are rebuilt from all finished rows after every row.

  make quant-bench                                         # = the line below
  .venv/bin/python benchmarks/quant_bench.py               # → results/quant/{results.json,results.md,*.png}
  .venv/bin/python benchmarks/quant_bench.py --only 'kashin-3$|rtn-3-g64$'   # a subset (regex on labels)
  .venv/bin/python benchmarks/quant_bench.py --smoke       # tiny random models, < 1 min, writes to a temp dir
"""
from __future__ import annotations

import os

if __name__ == "__main__":  # before torch loads: every model runs on one thread
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[_var] = "1"

import argparse
import copy
import dataclasses
import hashlib
import json
import math
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from child_runs import ONE_THREAD  # noqa: E402
from provenance import git_state  # noqa: E402

import leanformer as lf  # noqa: E402
from leanformer.compress.kashin import (ACTIVATION_ROUTE_TOKENS, COLUMN_MIDDLE_TOKENS, COLUMN_TABLE_TOKENS,  # noqa: E402
                                       TABLE_KERNEL_TOKENS)
from leanformer.compress.quantization import NATIVE_MAX_TOKENS, QuantConfig, quantized_layers  # noqa: E402
from leanformer.files import save_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = Path(__file__).resolve().parent
BOOTSTRAP = 1000
GROUPS = (32, 64, 128, 192, None)  # None = one group per row
PROMPT = "Once upon a time, there was a little girl named Lily."
LATENCY_MODES = ("default", "decode", "cache")  # latency_child: the quantized forwards timed
CACHE = Path(tempfile.gettempdir()) / "leanformer-quant-bench"  # --cache's default
LOW_BITS = ("kashin-3", "kashin-gptq-3", "rtn-3-g64", "hqq-3-g64", "gptq-3-g64", "gptq-3-row-compact", "plan-3.0")
LATENCY_SUBSET = (*LOW_BITS, "kashin-4", "rtn-4-g64", "hqq-4-g64")  # LOW_BITS: the ≤3-bit models the targets read
SMOKE_SUBSET = ("rtn-3-g64", "hqq-3-g192", "gptq-3-g64", "rtn-3-row-col", "kashin-3", "kashin-3-span2", "kashin-gptq-3",
                "plan-3.0")
SMOKE_LATENCY = ("kashin-3",)
FAMILY_STYLE = {  # plot colour and marker per family
    "rtn": ("tab:blue", "o"), "rtn+col": ("tab:cyan", "o"), "hqq": ("tab:green", "s"),
    "hqq+col": ("tab:olive", "s"), "gptq": ("darkgoldenrod", "P"), "gptq-compact": ("saddlebrown", "X"),
    "rtn-compact": ("navy", "o"), "kashin": ("tab:red", "D"), "kashin-nocol": ("tab:pink", "D"),
    "kashin-span": ("tab:purple", "^"), "kashin-auto": ("tab:brown", "v"), "kashin-gptq": ("crimson", "h"),
    "plan": ("black", "*"),
    "plan-profile": ("tab:gray", "*"), "plan-matched": ("tab:orange", "*"),
}


class Unavailable(Exception):
    """This version of the library does not offer what a configuration needs (reported, not measured)."""


# --------------------------------------------------------------------------------------------
# Configurations


@dataclass
class Spec:
    """One benchmark configuration: `make(context)` returns a QuantConfig, or a QuantPlan for lf.plan."""
    label: str
    family: str
    nominal_bits: float
    make: Callable[[dict], object]
    prior_seconds: float  # a guess at one minilm quantization, for the ETA until a family has been timed


def _has_field(cls, name: str) -> bool:
    return name in {f.name for f in dataclasses.fields(cls)}


COMPACT = {"scale_bits": 8, "zero_point": "integer", "clip": True}  # the grids of lf.plan's GPTQ candidates


def _grouped(cls, bits: int, group: int | None, col_scale: bool | None = None, **grid):
    def make(ctx):
        for name in grid:
            if not _has_field(cls, name):
                raise Unavailable(f"{cls.__name__} has no {name} field in this version of leanformer")
        kwargs = {"bits": bits, "group_size": group, "cache": True, **grid}
        if cls.CALIBRATED:  # GPTQ: the calibration lf.plan reads
            kwargs.update(calibration=ctx["calibration"], tokenizer=ctx["tokenizer"])
        if col_scale is not None:
            if not _has_field(cls, "col_scale"):
                raise Unavailable(f"{cls.__name__} has no col_scale field in this version of leanformer")
            kwargs["col_scale"] = col_scale
        return cls(**kwargs)
    return make


def _kashin(bits: int, **fields):
    def make(_ctx):
        for name, value in fields.items():
            if not _has_field(lf.Kashin, name):
                raise Unavailable(f"Kashin has no {name} field in this version of leanformer")
            if name == "layout":
                choices = next(f for f in dataclasses.fields(lf.Kashin) if f.name == "layout").metadata.get("choices", ())
                if value not in choices:
                    raise Unavailable(f"Kashin's layout offers {choices}, not {value!r}")
        return lf.Kashin(bits=bits, cache=True, **fields)
    return make


def _kashin_gptq(bits: int):
    def make(ctx):
        if not hasattr(lf, "KashinGPTQ"):
            raise Unavailable("KashinGPTQ is not in this version of leanformer")
        return lf.KashinGPTQ(bits=bits, cache=True, calibration=ctx["calibration"], tokenizer=ctx["tokenizer"])
    return make


_MEASURED_PLANS: dict[int, object] = {}  # id(calibration texts) → the plan measured on them (one per model)


def _plan(target_bits: float, use_profile: bool):
    def make(ctx):
        if not hasattr(lf, "plan"):
            raise Unavailable("lf.plan is not in this version of leanformer")
        # the measurement (every candidate on every layer) is the cost; each target and the ablation
        # re-allocate from it (QuantPlan.with_target), as a user sweeping budgets would. Measured with
        # use_profile=True so that the table holds the block influence the ablation weighs by;
        # with_target(…, use_profile=False) is then exactly lf.plan's default
        key = id(ctx["calibration"])
        if key not in _MEASURED_PLANS:
            _MEASURED_PLANS[key] = lf.plan(ctx["model"], target_bits=3.0, calibration=ctx["calibration"],
                                           tokenizer=ctx["tokenizer"], use_profile=True, progress=False)
        return _MEASURED_PLANS[key].with_target(target_bits, use_profile=use_profile)
    return make


def _plan_at_bits_of(label: str):
    """lf.plan at the honest bits/weight another config measured on the same model (ctx["bits_of"]): the
    comparison at equal storage, which a fixed target cannot give where that config's metadata costs more."""
    def make(ctx):
        bits = ctx.get("bits_of", {}).get(label)
        if bits is None:
            raise Unavailable(f"{label} has not been measured on this model yet (run it first)")
        return _plan(bits, False)(ctx)
    return make


def specs() -> list[Spec]:
    out = []
    for name, cls, prior in (("rtn", lf.RTN, 0.5), ("hqq", lf.HQQ, 3.0), ("gptq", lf.GPTQ, 5.0)):
        for bits in (2, 3, 4):
            for g in GROUPS:
                out.append(Spec(f"{name}-{bits}-{'row' if g is None else f'g{g}'}", name, bits,
                                _grouped(cls, bits, g), prior))
        if name != "hqq":  # compact, searched grids (8-bit scales, integer zeros, clip): lf.plan's GPTQ candidates
            for bits in (2, 3, 4):
                for g in (64, None):
                    out.append(Spec(f"{name}-{bits}-{'row' if g is None else f'g{g}'}-compact", f"{name}-compact",
                                    bits, _grouped(cls, bits, g, **COMPACT), prior))
        if name == "gptq":  # column scaling is offered to RTN and HQQ; GPTQ runs as its reference does, without
            continue
        for bits in (2, 3, 4):
            for g in (64, None):
                out.append(Spec(f"{name}-{bits}-{'row' if g is None else f'g{g}'}-col", f"{name}+col", bits,
                                _grouped(cls, bits, g, col_scale=True), prior))
    for bits in (2, 3, 4):
        out.append(Spec(f"kashin-{bits}", "kashin", bits, _kashin(bits, col_scale=True), 20.0))
        out.append(Spec(f"kashin-{bits}-nocol", "kashin-nocol", bits, _kashin(bits, col_scale=False), 20.0))
        out.append(Spec(f"kashin-{bits}-span2", "kashin-span", bits, _kashin(bits, rows_per_vector=2), 20.0))
    # the per-layer layout search encodes up to 12 candidate layouts per layer: 3 bits only
    out.append(Spec("kashin-3-auto", "kashin-auto", 3, _kashin(3, layout="auto"), 150.0))
    for bits in (2, 3, 4):
        out.append(Spec(f"kashin-gptq-{bits}", "kashin-gptq", bits, _kashin_gptq(bits), 60.0))
    for t in (2.5, 3.0, 3.5):
        out.append(Spec(f"plan-{t}", "plan", t, _plan(t, False), 90.0))  # lf.plan's defaults
        out.append(Spec(f"plan-{t}-profile", "plan-profile", t, _plan(t, True), 90.0))
    out.append(Spec("plan-at-kashin-3-bits", "plan-matched", 3, _plan_at_bits_of("kashin-3"), 90.0))
    return out


def apply_config(model, spec: Spec, ctx: dict) -> dict:
    """Quantize `model` in place by `spec`; what was done. A group size is applied where it fits a
    layer and per row elsewhere; a group that fits no layer raises Unavailable (the config is skipped)."""
    t0 = time.perf_counter()
    cfg = spec.make({**ctx, "model": model})
    info = {"fallback_per_row": [], "skipped_layers": {}}
    if not isinstance(cfg, QuantConfig):  # a QuantPlan
        info["settings"] = _jsonable(cfg.to_dict() if hasattr(cfg, "to_dict") else repr(cfg))
        reports = lf.quantize(model, cfg, progress=False)
        reports = reports if isinstance(reports, list) else [reports]
    else:
        info["settings"] = cfg.to_dict()
        reports, info["fallback_per_row"] = quantize_per_row_where_group_does_not_fit(model, cfg)
    for r in reports:
        info["skipped_layers"].update(r.skipped)
    set_cache(model, True)  # quality only: the rebuilt weights are the same, evaluation runs faster
    info["quantize_seconds"] = time.perf_counter() - t0
    return info


def quantize_per_row_where_group_does_not_fit(model, cfg: QuantConfig) -> tuple[list, list[str]]:
    """lf.quantize with cfg's group size where it divides a layer's input width and per row elsewhere (what a user
    would do for stories260K's 172-wide layers): the reports, and the layers quantized per row. A group that
    divides no layer raises Unavailable."""
    from leanformer.targets import linear_shape, select_linear

    g = getattr(cfg, "group_size", None)
    names = select_linear(model, cfg.targets)
    widths = {n: linear_shape(model.get_submodule(n))[0] for n in names}
    odd = [n for n in names if g is not None and widths[n] % g]
    if odd and len(odd) == len(names):
        raise Unavailable(f"group {g} divides no layer's input width ({', '.join(map(str, sorted(set(widths.values()))))})")
    reports = []
    if odd:
        reports.append(lf.quantize(model, dataclasses.replace(cfg, group_size=None, targets=odd), progress=False))
    reports.append(lf.quantize(model, dataclasses.replace(cfg, targets=[n for n in names if n not in odd]),
                               progress=False))
    return reports, odd


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=str))


def set_kernel(model, kernel: str) -> None:
    """Choose every QuantizedLinear's forward (QuantConfig.kernel) after loading, whatever was saved."""
    for layer in quantized_layers(model).values():
        layer.kernel = kernel


def set_cache(model, on: bool) -> None:
    """Turn QuantizedLinear's weight cache on or off after the fact (default off: rebuilt per forward)."""
    for layer in quantized_layers(model).values():
        layer.cache = on  # the setter drops a kept weight


# --------------------------------------------------------------------------------------------
# Metrics


def bootstrap(stat: Callable[[np.ndarray], float], n: int, seed: int) -> list[float]:
    """95 % percentile interval of stat(resampled indices) over BOOTSTRAP resamples of n items."""
    rng = np.random.default_rng(seed)
    values = [stat(rng.integers(0, n, n)) for _ in range(BOOTSTRAP)]
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]


@torch.no_grad()
def predictions(model, tok, texts: list[str], max_length: int, batch_size: int = 64) -> np.ndarray:
    """Class ids, in the order of `texts`; batched by length (less padding), each batch padded alone."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = np.zeros(len(texts), dtype=np.int64)
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        enc = tok([texts[j] for j in idx], truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        out[idx] = model(**enc).logits.argmax(-1).numpy()
    return out


@torch.no_grad()
def embeddings(encoder, tok, texts: list[str], max_length: int, batch_size: int = 64) -> torch.Tensor:
    """Mean-pooled last hidden state over valid tokens (sentence-transformers' pooling for MiniLM)."""
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tok(texts[i:i + batch_size], truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        h = encoder(**enc).last_hidden_state.float()
        mask = enc["attention_mask"].unsqueeze(-1).float()
        out.append((h * mask).sum(1) / mask.sum(1))
    return torch.cat(out)


@torch.no_grad()
def window_nll(model, windows: torch.Tensor, batch_size: int = 16) -> np.ndarray:
    """Summed next-token NLL of each window (tokens 2..L, context only from the window itself)."""
    out = []
    for i in range(0, len(windows), batch_size):
        ids = windows[i:i + batch_size]
        logits = model(input_ids=ids).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        out.append(nll.sum(1))
    return torch.cat(out).double().numpy()


def encoder_of(model):
    return model.base_model if hasattr(model, "base_model") else model


def minilm_quality(clf, enc_model, data: dict, ref: dict | None, seed: int) -> dict:
    """SST-2 accuracy and embedding cosine, with intervals; paired differences against `ref` (fp32)."""
    pred = predictions(clf, data["tok"], data["dev_texts"], data["max_length"])
    correct = (pred == data["dev_labels"]).astype(np.float64)
    acc = {"accuracy": float(correct.mean()), "ci": bootstrap(lambda i: correct[i].mean(), len(correct), seed),
           "n": len(correct), "predictions": pred.tolist()}
    emb = embeddings(encoder_of(enc_model), data["tok"], data["sentences"], data["max_length"])
    out = {"sst2": acc, "_emb": emb}
    if ref is not None:
        ref_correct = (np.asarray(ref["sst2"]["predictions"]) == data["dev_labels"]).astype(np.float64)
        d = correct - ref_correct
        acc["delta_vs_fp32"] = float(d.mean())
        acc["delta_ci"] = bootstrap(lambda i: d[i].mean(), len(d), seed)
        cos = torch.nn.functional.cosine_similarity(emb, ref["_emb"], dim=1).double().numpy()
        out["embedding"] = {"cosine": float(cos.mean()), "ci": bootstrap(lambda i: cos[i].mean(), len(cos), seed),
                            "min": float(cos.min()), "n": len(cos), "per_sentence": np.round(cos, 6).tolist()}
    return out


def stories_quality(model, data: dict, ref: dict | None, seed: int) -> dict:
    nll = window_nll(model, data["windows"])
    per = data["windows"].shape[1] - 1  # predicted tokens per window
    n = len(nll)
    out = {"perplexity": float(math.exp(nll.sum() / (n * per))),
           "ci": bootstrap(lambda i: math.exp(nll[i].sum() / (n * per)), n, seed),
           "windows": n, "window_tokens": per + 1, "nll_per_window": np.round(nll, 4).tolist()}
    if ref is not None:
        ref_nll = np.asarray(ref["nll_per_window"])
        out["delta_vs_fp32"] = out["perplexity"] - ref["perplexity"]
        out["delta_ci"] = bootstrap(lambda i: math.exp(nll[i].sum() / (n * per)) - math.exp(ref_nll[i].sum() / (n * per)),
                                    n, seed)
    return out


# --------------------------------------------------------------------------------------------
# Data and models


def full_setup(args) -> dict:
    """The real models and data (shared data root); the fine-tuned classifier is trained once and cached."""
    from leanformer.paths import data_root
    from leanformer.tasks import load_task
    from leanformer.text import read_text_files

    root = data_root(required=True)
    sst2 = load_task(str(root / "glue" / "SST-2"))
    rng = np.random.default_rng(args.seed)
    n_dev = min(args.sst2_dev, len(sst2.dev))
    dev_idx = np.sort(rng.choice(len(sst2.dev), n_dev, replace=False)) if n_dev < len(sst2.dev) else np.arange(n_dev)
    train = rng.permutation(len(sst2.train))
    sentences = [sst2.train.text_a[i] for i in train[:args.sentences]]
    calibration = [sst2.train.text_a[i] for i in train[args.sentences:args.sentences + args.calibration]]
    spare = [sst2.train.text_a[i] for i in train[args.sentences + args.calibration:]]  # read by neither
    clf, tok, _ = finetuned_minilm(Path(args.cache), sst2, args.finetune_steps, args.seed)
    base = lf.load("minilm")[0] if args.embeddings == "base" else None
    llama, ltok = lf.load("stories260k")
    stories = read_text_files([root / "text" / "tinystories.valid.txt"])
    return {"clf": clf, "base": base, "tok": tok, "llama": llama, "ltok": ltok, "max_length": 64,
            "dev_texts": [sst2.dev.text_a[i] for i in dev_idx], "dev_labels": np.asarray(sst2.dev.labels)[dev_idx],
            "dev_all": len(sst2.dev), "sentences": sentences, "calibration": calibration,
            "spare_sentences": spare, "windows": story_windows(ltok, stories, args.windows, args.window),
            "story_calibration": stories[-args.story_calibration:]}


def story_windows(tok, stories: list[str], n: int, length: int) -> torch.Tensor:
    """(n, length) token windows cut from the start of the stories' token stream (each with its BOS)."""
    ids: list[int] = []
    for s in stories:
        ids.extend(tok(s)["input_ids"])
        if len(ids) >= n * length:
            break
    if len(ids) < n * length:
        raise SystemExit(f"only {len(ids)} tokens of stories for {n} windows of {length}; lower --windows")
    return torch.tensor(ids[:n * length]).view(n, length)


def smoke_setup(args) -> dict:
    """Tiny random models (a BERT classifier and base, a Llama whose MLP is 96 wide) and toy text."""
    import random

    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, BertModel, LlamaConfig, \
        LlamaForCausalLM

    from leanformer.models import alias_path, ensure_pad_token

    tok = ensure_pad_token(AutoTokenizer.from_pretrained(str(alias_path("minilm"))))
    torch.manual_seed(0)
    bert = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                      vocab_size=tok.vocab_size, num_labels=2)
    clf = BertForSequenceClassification(bert).eval()
    base = BertModel(bert).eval() if args.embeddings == "base" else None
    llama = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=96, num_attention_heads=4,
                                         num_key_value_heads=2, num_hidden_layers=2, vocab_size=tok.vocab_size,
                                         max_position_embeddings=256)).eval()
    r = random.Random(0)
    words = ["bad", "awful", "good", "great", "the", "cat", "a", "dog", "sat", "ran"]
    sent = lambda k: " ".join(r.choice(words) for _ in range(k))  # noqa: E731
    windows = torch.randint(1000, 3000, (16, 32), generator=torch.Generator().manual_seed(0))
    return {"clf": clf, "base": base, "tok": tok, "llama": llama, "ltok": tok, "max_length": 32,
            "dev_texts": [sent(6) for _ in range(48)], "dev_labels": np.asarray([r.randint(0, 1) for _ in range(48)]),
            "dev_all": 48, "sentences": [sent(8) for _ in range(16)], "calibration": [sent(12) for _ in range(32)],
            "windows": windows, "story_calibration": [sent(30) for _ in range(16)]}


def finetuned_minilm(cache: Path, task, steps: int, seed: int):
    """Full fine-tune of minilm on SST-2 (batch 32, length 64), cached as an HF directory."""
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


# --------------------------------------------------------------------------------------------
# Finished rows: one JSON line each under --cache, reused on a rerun with the same settings


class Rows:
    def __init__(self, path: Path, fingerprint: str, fresh: bool):
        self.path, self.fingerprint = path, fingerprint
        self.rows: dict[str, dict] = {}
        if path.is_file() and not fresh:
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a crash
                    continue
                if row.get("fingerprint") == fingerprint:
                    self.rows[row["key"]] = row

    def get(self, key: str) -> dict | None:
        return self.rows.get(key)

    def add(self, key: str, row: dict) -> dict:
        row = {"key": key, "fingerprint": self.fingerprint, **row}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.rows[key] = row
        return row


# --------------------------------------------------------------------------------------------
# Latency and memory, in a fresh child process per saved model

CHILD = """
import json, resource, sys
import torch, leanformer
torch.set_num_threads(1)
sys.path.insert(0, {bench!r})
import quant_bench
quant_bench.import_architecture({spec!r}["dir"])
print(json.dumps(quant_bench.latency_child({spec!r})))
"""


def _proc_status_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux ≥ 4.0: write 5 to /proc/self/clear_refs), so the peak read
    after a step is that step's, not an import's transient."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def import_architecture(path: str) -> None:
    """Import the saved model's transformers modeling module (transformers imports it lazily on first
    use, tens of MiB of code), so the RSS after the imports does not charge it to loading the weights."""
    import transformers
    from transformers import AutoConfig

    from leanformer.models import model_class

    meta = Path(path) / "leanformer.json"
    if meta.is_file():  # lf.save's format names the class
        getattr(transformers, json.loads(meta.read_text())["base"]["model_class"])
    else:
        config = AutoConfig.from_pretrained(path)
        model_class(config, "auto")._model_mapping[type(config)]  # the lazy mapping imports the concrete class


def latency_child(spec: dict) -> dict:
    """Runs in the child (after importing torch and leanformer): load the saved model, time it with the
    cache off then on; after each step the peak RSS above the RSS right after the imports. Two
    readings: ru_maxrss (the process's lifetime peak, as getrusage reports it) and VmHWM after resetting
    the peak mark once the imports are done (not inflated by an import's transient allocations)."""
    base_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    reset = _reset_peak_rss()
    base_rss = _proc_status_kib("VmRSS")

    def mem(prefix: str) -> dict:
        out = {f"{prefix}_maxrss_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_maxrss) / 1024}
        hwm = _proc_status_kib("VmHWM")
        if reset and hwm is not None and base_rss is not None:
            out[f"{prefix}_mib"] = (hwm - base_rss) / 1024
        else:
            out[f"{prefix}_mib"] = out[f"{prefix}_maxrss_mib"]
        return out

    t0 = time.perf_counter()
    model, _ = lf.load(spec["dir"])
    out = {"load_seconds": time.perf_counter() - t0, "peak_reset": reset, **mem("rss_load")}
    quantized = bool(quantized_layers(model))
    timing = _encoder_timing if spec["kind"] == "encoder" else _decoder_timing
    # default: the library's default forward (kernel="native"); decode: the plain-torch rebuild of every weight on
    # every forward (the default before the fused kernels); cache: rebuilt once and kept (full-precision memory)
    for mode in LATENCY_MODES if quantized else ("default",):
        set_kernel(model, "decode" if mode == "decode" else "native")
        set_cache(model, mode == "cache")
        # one sentence per forward in the default forward only (decode rebuilds every weight per sentence)
        out[mode] = timing(model, spec if mode == "default" else {**spec, "single_sentences": 0})
        out[mode].update(mem("rss"))
    if spec.get("reference"):
        # the machine's speed drifts (other jobs, frequency): time this model and fp32 alternately in the same
        # process, one run each per round, and compare the medians of the pairs. fp32's own child gets a second
        # copy of fp32 as its reference: that A/A control is the noise floor of every other ratio.
        set_kernel(model, "native")
        set_cache(model, False)
        reference, _ = lf.load(spec["reference"])
        keys = {"paired": "ms_per_batch", "paired_single": "ms_per_sentence"} if spec["kind"] == "encoder" else \
            {"paired": "tokens_per_s"}
        once = {**spec, "repeats": 1}
        rounds = []
        for i in range(spec["pairs"]):  # who goes first alternates, so an effect of going second cancels too
            first, second = (model, reference) if i % 2 == 0 else (reference, model)
            a, b = timing(first, once), timing(second, once)
            rounds.append((a, b) if i % 2 == 0 else (b, a))
        for name, key in keys.items():
            pairs = [(q[key], f[key]) for q, f in rounds if key in q]
            if pairs:
                # ratio: the median over the rounds of (this model / fp32) in the same round, which cancels the
                # machine's speed of that moment (the targets read it); with its quartiles over the rounds
                ratios = [q / f for q, f in pairs]
                out[name] = {"value": statistics.median(q for q, _ in pairs),
                             "fp32": statistics.median(f for _, f in pairs),
                             "ratio": statistics.median(ratios), "ratio_quartiles": _quartiles(ratios),
                             "unit": key, "pairs": pairs}
    return out


def _quartiles(values: list[float]) -> list[float]:
    """The first and third quartiles (the interval the paired ratios are reported with)."""
    if len(values) < 2:
        return [values[0], values[0]]
    q = statistics.quantiles(values, n=4)
    return [q[0], q[2]]


def _ms_per_input(model, inputs: list[dict], repeats: int) -> list[float]:
    """Each run's ms per forward over `inputs`, after one warm-up pass (with the cache on, the one-time rebuild
    of every weight)."""
    for b in inputs:
        model(**b)
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for b in inputs:
            model(**b)
        runs.append((time.perf_counter() - t0) * 1000 / len(inputs))
    return runs


@torch.inference_mode()
def _encoder_timing(model, spec: dict) -> dict:
    batches = [{k: torch.tensor(v) for k, v in b.items()} for b in json.loads(Path(spec["inputs"]).read_text())]
    runs = _ms_per_input(model, batches, spec["repeats"])
    out = {"ms_per_batch": statistics.median(runs), "runs_ms": runs, "batches": len(batches),
           "batch_size": len(batches[0]["input_ids"])}
    # batch 1: the first sentences one per forward, without padding (a request served alone)
    single = [{k: v[i:i + 1, :int(b["attention_mask"][i].sum()) if "attention_mask" in b else None]
               for k, v in b.items()}
              for b in batches for i in range(len(b["input_ids"]))][:spec.get("single_sentences", 0)]
    if single:
        runs = _ms_per_input(model, single, spec["repeats"])
        out.update(ms_per_sentence=statistics.median(runs), single_runs_ms=runs, sentences=len(single),
                   sentence_tokens=[int(o["input_ids"].shape[1]) for o in single])
    return out


@torch.inference_mode()
def greedy(model, ids: torch.Tensor, new_tokens: int, pad_id: int) -> torch.Tensor:
    """Exactly `new_tokens` greedy tokens after the (1, n) prompt ids, with the KV cache: the timed batch-1 step."""
    return model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True,
                          pad_token_id=pad_id, attention_mask=torch.ones_like(ids))


@torch.inference_mode()
def _decoder_timing(model, spec: dict) -> dict:
    ids = torch.tensor([spec["prompt_ids"]])
    out = greedy(model, ids, spec["new_tokens"], spec["pad_id"])  # warm-up
    runs = []
    for _ in range(spec["repeats"]):
        t0 = time.perf_counter()
        out = greedy(model, ids, spec["new_tokens"], spec["pad_id"])
        runs.append(time.perf_counter() - t0)
    new = out.shape[1] - ids.shape[1]
    return {"tokens_per_s": new / statistics.median(runs), "runs_s": runs, "new_tokens": new,
            "generated_ids": out[0, ids.shape[1]:].tolist()}


def run_latency_child(spec: dict) -> dict:
    code = CHILD.format(bench=str(BENCH_DIR), spec=spec)
    proc = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, **ONE_THREAD), capture_output=True,
                          text=True, timeout=900)
    if proc.returncode:
        raise RuntimeError(f"latency child for {spec['dir']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def forward_code() -> str:
    """A hash of the quantized forward's code (the compress package, its C++ kernels included): a latency row
    measured with other code is measured again."""
    package = Path(lf.__file__).parent / "compress"
    digest = hashlib.sha256()
    for path in sorted([*package.glob("*.py"), *package.glob("*.cpp")]):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def dir_bytes(path: Path) -> dict:
    return {"safetensors_bytes": sum(p.stat().st_size for p in path.glob("*.safetensors")),
            "dir_bytes": sum(p.stat().st_size for p in path.iterdir() if p.is_file())}


def saved_dir(cache: Path, fingerprint: str, model_key: str, label: str) -> Path:
    return cache / "saved" / fingerprint / model_key / label


def is_saved(path: Path) -> bool:
    return (path / "leanformer.json").is_file() or (path / "config.json").is_file()


def save_model(model, tok, path: Path) -> None:
    if not is_saved(path):
        lf.save(model, tok, path, overwrite=True, base_weights="stored")


# --------------------------------------------------------------------------------------------
# The run


class Eta:
    """Seconds left: measured mean per (model, family) where timed, else the spec's prior guess."""

    def __init__(self):
        self.seconds: dict[tuple, list[float]] = {}

    def add(self, key: tuple, s: float):
        self.seconds.setdefault(key, []).append(s)

    def guess(self, key: tuple, prior: float) -> float:
        return statistics.mean(self.seconds[key]) if key in self.seconds else prior


def prior_row_seconds(model_key: str, spec: Spec, data: dict, embeddings_model: str) -> float:
    if model_key == "stories260k":
        return 2.0 + spec.prior_seconds / 10
    n_q = 2 if embeddings_model == "base" else 1
    return n_q * spec.prior_seconds + 0.03 * (len(data["dev_texts"]) + len(data["sentences"]))


def parser() -> argparse.ArgumentParser:
    """The bench's flags; their defaults are the settings results/quant was measured with (plan_objective.py reads
    them for the same data)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="output directory (default results/quant; --smoke: a temp dir)")
    ap.add_argument("--cache", default=None,
                    help="fine-tuned classifier, saved models, rows.jsonl (default $TMPDIR/leanformer-quant-bench)")
    ap.add_argument("--only", default=None, help="regex: run only configs whose label it matches (re.search)")
    ap.add_argument("--smoke", action="store_true", help="tiny random models and toy data, < 1 min")
    ap.add_argument("--fresh", action="store_true", help="ignore finished rows in --cache/rows.jsonl")
    ap.add_argument("--no-latency", action="store_true", help="quality only")
    ap.add_argument("--embeddings", choices=("classifier", "base"), default="classifier",
                    help="whose sentence embeddings the cosine compares (module docstring)")
    ap.add_argument("--sst2-dev", type=int, default=436, help="SST-2 dev examples (fixed random sample; 872 = all)")
    ap.add_argument("--sentences", type=int, default=128, help="held-out SST-2 train sentences for the cosine")
    ap.add_argument("--calibration", type=int, default=512,
                    help="SST-2 train sentences for lf.plan's and GPTQ's calibration (512: about 6,900 tokens, of which the plan "
                         "reads its default 4,096; 64 gave 939, under a quarter of them)")
    ap.add_argument("--windows", type=int, default=64, help="TinyStories windows for perplexity")
    ap.add_argument("--window", type=int, default=256, help="tokens per window")
    ap.add_argument("--story-calibration", type=int, default=32, help="TinyStories stories for lf.plan's and GPTQ's calibration")
    ap.add_argument("--finetune-steps", type=int, default=200)
    # many short rounds rather than a few long ones: on a shared machine whose speed swings by tens of per cent
    # within minutes, the paired ratio needs rounds more than it needs length
    ap.add_argument("--repeats", type=int, default=15, help="latency: timed runs (median), and minilm's paired rounds")
    ap.add_argument("--latency-batches", type=int, default=2, help="minilm SST-2 dev batches of 32 timed per run")
    ap.add_argument("--new-tokens", type=int, default=64, help="stories260K tokens generated per timed run")
    # a stories260K generation takes about 0.15 s: many more pairs cost little, and its ratios sit within a few per
    # cent of 1, where 15 pairs leave the A/A control's median 3 % off
    ap.add_argument("--decoder-pairs", type=int, default=75, help="stories260K: paired rounds against fp32")
    ap.add_argument("--single-sentences", type=int, default=16,
                    help="minilm batch 1: SST-2 dev sentences timed one per forward (unpadded) per run")
    ap.add_argument("--seed", type=int, default=0)
    return ap


def main(argv=None):
    args = parser().parse_args(argv)
    started = time.perf_counter()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    scratch = Path(tempfile.mkdtemp(prefix="quant_bench_smoke_")) if args.smoke else None
    out = Path(args.out) if args.out else (scratch / "results" if args.smoke else ROOT / "results" / "quant")
    cache = Path(args.cache) if args.cache else (
        scratch / "cache" if args.smoke else CACHE)
    if args.smoke:
        args.repeats, args.latency_batches, args.new_tokens, args.single_sentences, args.decoder_pairs = 2, 2, 8, 4, 2
    out.mkdir(parents=True, exist_ok=True)
    cache.mkdir(parents=True, exist_ok=True)
    args.cache = str(cache)  # what the setup reads (the fine-tuned classifier lives there)

    data = smoke_setup(args) if args.smoke else full_setup(args)
    settings = {k: v for k, v in vars(args).items()  # what the quality rows depend on (latency rows: latency())
                if k not in ("out", "cache", "only", "fresh", "no_latency", "repeats", "latency_batches", "new_tokens",
                             "single_sentences", "decoder_pairs")}
    settings["sst2_dev"] = len(data["dev_texts"])
    fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    rows = Rows(cache / "rows.jsonl", fingerprint, args.fresh)
    git = git_state()
    setup = {"settings": settings, "git": git, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
             "machine": platform.machine(), "processor": platform.processor(), "python": platform.python_version(),
             "sst2_dev_of": data["dev_all"], "bootstrap": BOOTSTRAP,
             "command": "python benchmarks/quant_bench.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    all_specs = specs()
    wanted = SMOKE_SUBSET if args.smoke else None
    selected = [s for s in all_specs if (wanted is None or s.label in wanted)
                and (args.only is None or re.search(args.only, s.label))]
    models = {"minilm": data["clf"], "stories260k": data["llama"]}
    skipped: dict[str, str] = {}

    def rebuild(plot: bool = True):
        write(out, setup, all_specs, rows, skipped, plot)

    # fp32 references (cached like every other row)
    ref = {}
    for key in models:
        row = rows.get(f"{key}/fp32")
        if row is None:
            t0 = time.perf_counter()
            if key == "minilm":
                q = minilm_quality(data["clf"], data["base"] or data["clf"], data, None, args.seed)
                q.pop("_emb")
            else:
                q = {"tinystories": stories_quality(data["llama"], data, None, args.seed)}
            row = rows.add(f"{key}/fp32", {"model": key, "config": "fp32", "family": "fp32", "git": git,
                                            "seconds": time.perf_counter() - t0, **q})
        ref[key] = row
    ref["minilm"] = {**ref["minilm"], "_emb": embeddings(encoder_of(data["base"] or data["clf"]), data["tok"],
                                                         data["sentences"], data["max_length"])}
    print(f"fp32: SST-2 dev {ref['minilm']['sst2']['accuracy']:.4f} ({len(data['dev_texts'])} examples), "
          f"TinyStories ppl {ref['stories260k']['tinystories']['perplexity']:.4f}", flush=True)

    eta = Eta()
    todo = [(key, s) for s in selected for key in models if rows.get(f"{key}/{s.label}") is None]
    print(f"{len(selected)} configs selected, {len(todo)} model×config rows to measure, "
          f"{len(selected) * len(models) - len(todo)} finished earlier; first ETA "
          f"{sum(prior_row_seconds(k, s, data, args.embeddings) for k, s in todo) / 60:.0f} min (priors)", flush=True)
    latency_labels = [lab for lab in (SMOKE_LATENCY if args.smoke else LATENCY_SUBSET)
                      if args.only is None or re.search(args.only, lab)]
    for done, (key, spec) in enumerate(todo, 1):
        rk = f"{key}/{spec.label}"
        t0 = time.perf_counter()
        try:
            bits_of = {s.label: r["bits_per_weight"] for s in all_specs if (r := rows.get(f"{key}/{s.label}"))}
            row = quality_row(key, spec, data, ref[key], args, cache,
                              rows.fingerprint if spec.label in latency_labels else None, bits_of)
        except Unavailable as e:
            skipped[rk] = str(e)
            print(f"  skip {rk}: {e}", flush=True)
            continue
        row.update(model=key, config=spec.label, family=spec.family, nominal_bits=spec.nominal_bits, git=git,
                   seconds=time.perf_counter() - t0)
        rows.add(rk, row)
        eta.add((key, spec.family), row["seconds"])
        remaining = sum(eta.guess((k, s.family), prior_row_seconds(k, s, data, args.embeddings)) for k, s in todo[done:])
        print(f"[{done}/{len(todo)}] {rk:<32} {row['bits_per_weight']:.3f} b/w  {quality_text(row)}  "
              f"({row['seconds']:.0f} s; elapsed {(time.perf_counter() - started) / 60:.1f} min, "
              f"ETA {remaining / 60:.1f} min + latency)", flush=True)
        rebuild(plot=False)

    if not args.no_latency and latency_labels:
        latency(data, rows, all_specs, latency_labels, ["fp32"] + latency_labels, cache, args, git, skipped)
    rebuild()
    print((out / "results.md").read_text())
    print(f"done in {(time.perf_counter() - started) / 60:.1f} min; results in {out}")


def quality_row(key: str, spec: Spec, data: dict, ref: dict, args, cache: Path, fingerprint: str | None,
                bits_of: dict | None = None) -> dict:
    """One model × config: quantize, measure; saved under --cache when `fingerprint` is given (latency subset).
    bits_of: honest bits/weight of configs already measured on this model (for plan-at-kashin-3-bits)."""
    from leanformer.compress import relative_weight_errors

    if key == "minilm":
        q = copy.deepcopy(data["clf"])
        ctx = {"calibration": data["calibration"], "tokenizer": data["tok"], "bits_of": bits_of or {}}
        info = apply_config(q, spec, ctx)
        enc = q
        if data["base"] is not None:
            enc = copy.deepcopy(data["base"])
            base_info = apply_config(enc, spec, ctx)
            info["base_bits_per_weight"] = lf.size_report(enc).total["bits_per_weight"]
            info["base_quantize_seconds"] = base_info["quantize_seconds"]
        metrics = minilm_quality(q, enc, data, ref, args.seed)
        metrics.pop("_emb")
        tok, orig = data["tok"], data["clf"]
    else:
        q = copy.deepcopy(data["llama"])
        info = apply_config(q, spec, {"calibration": data["story_calibration"], "tokenizer": data["ltok"],
                                      "bits_of": bits_of or {}})
        metrics = {"tinystories": stories_quality(q, data, ref["tinystories"], args.seed)}
        tok, orig = data["ltok"], data["llama"]
    errors = relative_weight_errors(orig, q)
    row = {**info, **metrics, "bits_per_weight": lf.size_report(q).total["bits_per_weight"],
           "weight_error_mean": sum(errors.values()) / max(len(errors), 1)}
    if fingerprint:  # the latency phase reloads it from disk
        set_cache(q, False)
        save_model(q, tok, saved_dir(cache, fingerprint, key, spec.label))
    return row


def quality_text(row: dict) -> str:
    if "tinystories" in row:
        return f"ppl {row['tinystories']['perplexity']:.4f}"
    return f"acc {row['sst2']['accuracy']:.4f}  cos {row['embedding']['cosine']:.4f}"


def latency(data, rows: Rows, all_specs, labels, order, cache: Path, args, git, skipped) -> None:
    """fp32 and the subset: save (if needed), then one child process per model and config."""
    by_label = {s.label: s for s in all_specs}
    lat_settings = {"repeats": args.repeats, "latency_batches": args.latency_batches, "new_tokens": args.new_tokens,
                    "single_sentences": args.single_sentences, "modes": list(LATENCY_MODES),
                    "forward_code": forward_code(), "pairing": "alternating order; fp32 against a second copy"}
    inputs = cache / f"latency_inputs_{rows.fingerprint}.json"
    dev = data["dev_texts"][:32 * args.latency_batches]
    batches = []
    for i in range(0, len(dev), 32):
        enc = data["tok"](dev[i:i + 32], truncation=True, max_length=data["max_length"], padding=True)
        batches.append({k: v for k, v in enc.items()})
    inputs.write_text(json.dumps(batches))
    prompt_ids = data["ltok"](PROMPT)["input_ids"]
    pad = data["ltok"].pad_token_id if data["ltok"].pad_token_id is not None else data["ltok"].eos_token_id
    for label in order:
        for key, model, tok in (("stories260k", data["llama"], data["ltok"]), ("minilm", data["clf"], data["tok"])):
            rk = f"latency/{key}/{label}"
            settings = {**lat_settings, "pairs": args.decoder_pairs} if key == "stories260k" else lat_settings
            if (rows.get(rk) or {}).get("latency_settings") == settings:
                continue
            path = saved_dir(cache, rows.fingerprint, key, label)
            if not is_saved(path):
                q = copy.deepcopy(model)
                if label != "fp32":
                    try:
                        apply_config(q, by_label[label], {"calibration": data["calibration" if key == "minilm" else
                                                                             "story_calibration"], "tokenizer": tok})
                    except Unavailable as e:
                        skipped[rk] = str(e)
                        print(f"  skip {rk}: {e}", flush=True)
                        continue
                    set_cache(q, False)
                save_model(q, tok, path)
            spec = {"dir": str(path), "repeats": args.repeats,
                    "pairs": args.decoder_pairs if key == "stories260k" else args.repeats}
            reference = saved_dir(cache, rows.fingerprint, key, "fp32")
            if is_saved(reference):  # for fp32 itself: a second copy, the A/A control
                spec["reference"] = str(reference)
            if key == "minilm":
                spec.update(kind="encoder", inputs=str(inputs), single_sentences=args.single_sentences)
            else:
                spec.update(kind="decoder", prompt_ids=prompt_ids, new_tokens=args.new_tokens, pad_id=pad)
            t0 = time.perf_counter()
            result = run_latency_child(spec)
            row = rows.add(rk, {"model": key, "config": label, "git": git, "disk": dir_bytes(path),
                                "latency_settings": settings,
                                "seconds": time.perf_counter() - t0, **result})
            d = row["default"]
            speed = f"{d['tokens_per_s']:.1f} tok/s" if key == "stories260k" else f"{d['ms_per_batch']:.1f} ms/batch"
            print(f"  latency {key:<12} {label:<12} {speed}  RSS on load {row['rss_load_mib']:.1f} MiB", flush=True)


# --------------------------------------------------------------------------------------------
# Results: JSON, markdown, plots — all rebuilt from the finished rows


def pareto_front(points: list[tuple[float, float]], higher_is_better: bool) -> list[int]:
    """Indices of the points no other point dominates (fewer or equal bits and better or equal quality,
    one of them strictly)."""
    sign = 1 if higher_is_better else -1
    front = []
    for i, (b, q) in enumerate(points):
        if not any((b2 <= b and sign * q2 >= sign * q) and (b2 < b or sign * q2 > sign * q)
                   for j, (b2, q2) in enumerate(points) if j != i):
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


METRICS = {  # model → [(panel name, row → quality, higher is better, row → interval or None)]
    "minilm": [("embedding cosine", lambda r: r["embedding"]["cosine"], True, lambda r: r["embedding"]["ci"]),
               ("SST-2 dev accuracy", lambda r: r["sst2"]["accuracy"], True, lambda r: r["sst2"]["ci"])],
    "stories260k": [("TinyStories perplexity", lambda r: r["tinystories"]["perplexity"], False,
                     lambda r: r["tinystories"]["ci"])],
}
PRIMARY = {"minilm": "embedding cosine", "stories260k": "TinyStories perplexity"}


def paired_delta(model: str, a: dict, b: dict, seed: int = 0) -> tuple[float, list[float]]:
    """The primary metric of row a minus row b, with a 95 % bootstrap interval that resamples the same
    sentences (cosine) or windows (perplexity) for both: whether a difference is more than the sample's noise."""
    if model == "minilm":
        d = np.asarray(a["embedding"]["per_sentence"]) - np.asarray(b["embedding"]["per_sentence"])
        return float(d.mean()), bootstrap(lambda i: d[i].mean(), len(d), seed)
    na, nb = np.asarray(a["tinystories"]["nll_per_window"]), np.asarray(b["tinystories"]["nll_per_window"])
    tokens = len(na) * (a["tinystories"]["window_tokens"] - 1)  # predicted tokens, as stories_quality counts them

    def ppl_gap(i):
        return math.exp(na[i].sum() / tokens) - math.exp(nb[i].sum() / tokens)
    return ppl_gap(np.arange(len(na))), bootstrap(ppl_gap, len(na), seed)


def summarize(rows: Rows, all_specs) -> dict:
    order = {s.label: i for i, s in enumerate(all_specs)}
    quality = {m: sorted([r for r in rows.rows.values() if r["model"] == m and not r["key"].startswith("latency/")
                          and r["config"] != "fp32"], key=lambda r: order.get(r["config"], 1e9)) for m in METRICS}
    fronts = {}
    for m, panels in METRICS.items():
        fronts[m] = {}
        for name, get, higher, _ in panels:
            pts = [(r["bits_per_weight"], get(r)) for r in quality[m]]
            fronts[m][name] = [quality[m][i]["config"] for i in pareto_front(pts, higher)]
    return {"quality": quality, "fronts": fronts}


def write(out: Path, setup: dict, all_specs, rows: Rows, skipped: dict, plot: bool = True) -> None:
    """results.json and results.md (and the plots: slow, so not after every row) from the finished rows."""
    summary = summarize(rows, all_specs)
    fp32 = {m: rows.get(f"{m}/fp32") for m in METRICS}
    lat = [r for r in rows.rows.values() if r["key"].startswith("latency/")]
    commits = sorted({r["git"]["commit"] + ("+dirty" if r["git"]["dirty"] else "") for r in rows.rows.values()})
    result = {"setup": setup, "commits_of_rows": commits, "fp32": fp32, "rows": summary["quality"],
              "pareto_fronts": summary["fronts"], "latency": lat, "skipped": skipped,
              "targets": targets(summary, rows)}
    save_json(out / "results.json", result)
    (out / "results.md").write_text(markdown(result))
    if plot:
        plots(result, out)


def _lat(rows: Rows, model: str, label: str) -> dict | None:
    return rows.get(f"latency/{model}/{label}")


def targets(summary: dict, rows: Rows) -> list[dict]:
    """Each target with the numbers that decide it: met, missed, or not measured."""
    out = []
    # each reads the same-process alternating timing against fp32 (latency_child's paired keys), which cancels the
    # machine's drift; a row without it counts as not measured
    for name, model, paired, ok in (
            ("≤3-bit models at batch 1 at least as fast as fp32 (stories260K tokens/s, default forward: kernel='native')",
             "stories260k", "paired", lambda ratio: ratio >= 1.0),
            ("≤3-bit models at batch 32 within 1.2× fp32 (minilm ms per batch, default forward: kernel='native')",
             "minilm", "paired", lambda ratio: ratio <= 1.2),
            ("≤3-bit models at batch 1 on minilm at least as fast as fp32 (one sentence per forward, ms per sentence, "
             "default forward; a reading beyond the issue's list)", "minilm", "paired_single", lambda ratio: ratio <= 1.0)):
        found = {lab: r[paired] for lab in LOW_BITS if (r := _lat(rows, model, lab)) is not None and paired in r}
        if not found:
            out.append({"target": name, "status": "not measured", "detail": "no latency rows yet"})
            continue
        detail = {k: {"value": p["value"], "fp32": p["fp32"], "ratio": p["ratio"], "met": ok(p["ratio"]),
                      "quartiles": p.get("ratio_quartiles")} for k, p in found.items()}
        missing = [lab for lab in LOW_BITS if lab not in found]
        status = "missed" if not all(d["met"] for d in detail.values()) else "incomplete" if missing else "met"
        control = (_lat(rows, model, "fp32") or {}).get(paired)  # fp32 against a second copy: the noise floor
        out.append({"target": name, "status": status, "detail": detail, "missing": missing,
                    "control": control and {"ratio": control["ratio"], "quartiles": control.get("ratio_quartiles")}})
    detail = {}
    for m in METRICS:
        front = summary["fronts"][m].get(PRIMARY[m], [])
        detail[m] = {"front": front, "kashin_on_front": [c for c in front if c.startswith("kashin")]}
    measured = all(any(r["family"].startswith("kashin") for r in summary["quality"][m]) for m in METRICS)
    out.append({"target": "Kashin (any variant) on the Pareto front on both models (primary metric)",
                "status": "not measured" if not measured else
                ("met" if all(d["kashin_on_front"] for d in detail.values()) else "missed"), "detail": detail})
    for plan_label, title in (("plan-3.0", "plan-3.0 beats uniform Kashin-3 (primary metric, both models)"),
                              ("plan-at-kashin-3-bits", "the plan at uniform Kashin-3's honest bits/weight beats it "
                                                        "(primary metric, both models)")):
        detail, status = {}, "met"
        for m, panels in METRICS.items():
            by = {r["config"]: r for r in summary["quality"][m]}
            if plan_label not in by or "kashin-3" not in by:
                status = "not measured"
                continue
            p, k = by[plan_label], by["kashin-3"]
            for name, get, higher, _ in panels:
                better = get(p) > get(k) if higher else get(p) < get(k)
                detail[f"{m}: {name}"] = {plan_label: get(p), "kashin-3": get(k), "plan_bits": p["bits_per_weight"],
                                          "kashin_bits": k["bits_per_weight"], "plan_better": better}
                if name == PRIMARY[m]:
                    delta, ci = paired_delta(m, p, k)
                    # better beyond the sample's noise: the paired interval excludes 0 on the better side
                    clear = ci[0] > 0 if higher else ci[1] < 0
                    detail[f"{m}: {name}"].update(delta=delta, delta_ci=ci, clearly_better=clear)
                if name == PRIMARY[m] and not better and status == "met":
                    status = "missed"
        out.append({"target": title, "status": status, "detail": detail, "plan": plan_label})
    return out


def _ci(ci) -> str:
    return f"[{ci[0]:.4f}, {ci[1]:.4f}]"


def markdown(res: dict) -> str:
    s = res["setup"]
    st = s["settings"]
    fp = res["fp32"]
    lines = ["# Quantization: quality against honest bits per weight, and latency", "",
             f"Commit {s['git']['commit'][:12]}{' (uncommitted changes)' if s['git']['dirty'] else ''}; rows measured at: "
             f"{', '.join(c[:12] + ('+dirty' if c.endswith('+dirty') else '') for c in res['commits_of_rows'])}. "
             f"`{s['command']}`. torch {s['torch']}, {s['torch_threads']} thread, {s['machine']}.", ""]
    if fp["minilm"] and fp["stories260k"]:
        lines += [
            f"minilm: the fine-tuned SST-2 classifier ({st['finetune_steps']} steps, cached), accuracy on "
            f"{st['sst2_dev']} of {s['sst2_dev_of']} dev examples (fixed random sample, seed {st['seed']}): fp32 "
            f"{fp['minilm']['sst2']['accuracy']:.4f} {_ci(fp['minilm']['sst2']['ci'])}; embedding cosine vs fp32 on "
            f"{st['sentences']} held-out SST-2 training sentences ({st['embeddings']} model's mean-pooled last hidden "
            f"state). stories260K: {st['windows']} windows of {st['window']} TinyStories validation tokens, fp32 "
            f"perplexity {fp['stories260k']['tinystories']['perplexity']:.4f} "
            f"{_ci(fp['stories260k']['tinystories']['ci'])}. Intervals: 95 % bootstrap ({s['bootstrap']} resamples) "
            "over examples / sentences / windows; Δ intervals are paired (same resample for fp32 and the config).", ""]
    if st.get("smoke"):
        lines += ["**Smoke run: tiny random models and toy data; the numbers mean nothing.**", ""]
    lines += ["Bits/w: every stored byte of the quantized Linear layers (codes, scales, zeros, step sizes, column "
              "scales, codebooks, seeds) per weight (lf.size_report). Embeddings, norms, biases and heads stay fp32.", "",
              f"Calibration (GPTQ, KashinGPTQ and lf.plan; no other method reads data): {st['calibration']} SST-2 "
              f"training sentences after the embedding sentences; the last {st['story_calibration']} TinyStories validation "
              "stories (the perplexity windows come from the file's start). GPTQ runs with its defaults: act order "
              "with static groups, sequential, 1 % damping, up to 4,096 calibration tokens, float16 scales and minima. "
              "The -compact rows (RTN and GPTQ) store each group's grid as lf.plan's GPTQ candidates do: an 8-bit "
              "log-coded scale, an integer zero point in b bits, the range searched (scale_bits=8, "
              "zero_point='integer', clip=True). KashinGPTQ (kashin-gptq rows) runs with its defaults, GPTQ's "
              "calibration and compensation (act order, sequential, 1 % damping) and Kashin's closed codebook on each "
              "column of W (DCT, 4 sweeps, 8-bit step sizes).", ""]
    lines += ["## Targets", "", "| target | status | numbers |", "|---|---|---|"]
    for t in res["targets"]:
        lines.append(f"| {t['target']} | **{t['status']}** | {_target_numbers(t)} |")
    for m, panels in METRICS.items():
        rows = res["rows"][m]
        lines += ["", f"## {m}", "", f"![{m}]({m}_pareto.png)", ""]
        if not rows:
            lines.append("No rows yet.")
            continue
        fronts = res["pareto_fronts"][m]
        head = "| config | family | bits/w | " + " | ".join(f"{n} [95 % CI] | Δ vs fp32 [95 % CI]" for n, *_ in panels) \
            + " | front | weight err | quantize s | notes |"
        lines += [head, "|" + "---|" * (head.count("|") - 1)]
        for r in rows:
            cells = []
            for name, get, _, ci in panels:
                block = r["embedding"] if name == "embedding cosine" else r["sst2"] if m == "minilm" else r["tinystories"]
                delta = (f"{block['delta_vs_fp32']:+.4f} {_ci(block['delta_ci'])}" if "delta_vs_fp32" in block else "—")
                cells.append(f"{get(r):.4f} {_ci(ci(r))} | {delta}")
            on = ", ".join(n.split()[-1] for n in fronts if r["config"] in fronts[n]) or ""
            notes = []
            if r.get("fallback_per_row"):
                notes.append(f"per row on {len(r['fallback_per_row'])} layers the group does not divide")
            if r.get("skipped_layers"):
                notes.append(f"{len(r['skipped_layers'])} layers kept fp32")
            lines.append(f"| {r['config']} | {r['family']} | {r['bits_per_weight']:.3f} | " + " | ".join(cells)
                         + f" | {on} | {r['weight_error_mean']:.4f} | {r['quantize_seconds']:.1f} | {'; '.join(notes)} |")
        lines += ["", "Families with a point on the Pareto front:", "", "| family | " + " | ".join(fronts) + " |",
                  "|---|" + "---|" * len(fronts)]
        fams = list(dict.fromkeys(r["family"] for r in rows))
        by = {r["config"]: r["family"] for r in rows}
        for fam in fams:
            lines.append(f"| {fam} | " + " | ".join(
                ", ".join(c for c in fronts[n] if by[c] == fam) or "no" for n in fronts) + " |")
    for plan_label in ("plan-3.0", "plan-at-kashin-3-bits"):
        lines += ["", f"## {plan_label} against uniform Kashin-3", ""]
        plan_t = next(t for t in res["targets"] if t.get("plan") == plan_label)
        if plan_t["detail"]:
            lines += [f"| model: metric | {plan_label} | kashin-3 | bits/w plan / kashin | plan better | "
                      "Δ plan − kashin [95 % CI, paired] | beyond the noise |", "|---|---|---|---|---|---|---|"]
            for k, d in plan_t["detail"].items():
                paired = (f"{d['delta']:+.4f} {_ci(d['delta_ci'])} | {'yes' if d['clearly_better'] else 'no'}"
                          if "delta" in d else "— | —")
                lines.append(f"| {k} | {d[plan_label]:.4f} | {d['kashin-3']:.4f} | {d['plan_bits']:.3f} / "
                             f"{d['kashin_bits']:.3f} | {'yes' if d['plan_better'] else 'no'} | {paired} |")
        else:
            lines.append(f"Not measured ({plan_label} or kashin-3 has no row).")
    lines += _latency_md(res["latency"])
    if res["skipped"]:
        lines += ["", "## Skipped (not measured)", ""] + [f"- {k}: {v}" for k, v in sorted(res["skipped"].items())]
    return "\n".join(lines) + "\n"


def _target_numbers(t: dict) -> str:
    if t["status"] == "not measured" and not isinstance(t["detail"], dict):
        return t["detail"]
    if t["target"].startswith("≤3-bit"):
        text = "; ".join(f"{k} {d['ratio']:.2f}× fp32{_quartile_text(d.get('quartiles'))}" for k, d in t["detail"].items())
        if t.get("control"):
            text += (f"; A/A control (fp32 against a second fp32 copy, same procedure) {t['control']['ratio']:.2f}"
                     f"{_quartile_text(t['control'].get('quartiles'))}")
        return text + (f"; not measured: {', '.join(t['missing'])}" if t.get("missing") else "")
    if t["target"].startswith("Kashin"):
        return "; ".join(f"{m}: {', '.join(d['kashin_on_front']) or 'none'} of front {', '.join(d['front'])}"
                         for m, d in t["detail"].items())
    return "; ".join(f"{k}: {d[t['plan']]:.4f} vs {d['kashin-3']:.4f} ({d['plan_bits']:.3f} vs {d['kashin_bits']:.3f} "
                     "bits/w" + (f"; Δ {d['delta']:+.4f} {_ci(d['delta_ci'])}" if "delta" in d else "") + ")"
                     for k, d in t["detail"].items()) or "—"


def _quartile_text(q: list[float] | None) -> str:
    return f" [{q[0]:.2f}, {q[1]:.2f}]" if q else ""


def _latency_md(lat: list[dict]) -> list[str]:
    lines = ["", "## Latency and memory", ""]
    if not lat:
        return lines + ["Not measured yet."]
    lines += ["One torch thread, each model loaded from its saved directory in a fresh child process; median of the "
              "timed runs after a warm-up. default = the library's default forward, kernel='native': fused C++ "
              f"kernels multiply with the codes for calls of up to {NATIVE_MAX_TOKENS} tokens (Kashin: up to "
              f"{TABLE_KERNEL_TOKENS}, then up to {ACTIVATION_ROUTE_TOKENS} A and B decoded a block of rows at a time "
              "and multiplied with x and Pᵀx in one matmul; KashinGPTQ: up to "
              f"{COLUMN_TABLE_TOKENS} per input its tables scaled by x_i, then up to {COLUMN_MIDDLE_TOKENS} x A and "
              "x B by blocks of decoded rows, P on the output) and rebuild the weight in one pass above (Kashin: B looked up in the FFT's order, P by torch's FFT with its middle step fused, "
              "then A, P B and the column scales combined into the weight in one pass); decode = every weight rebuilt "
              "with plain torch ops on every forward (the default before the fused kernels); cache = rebuilt once "
              "and kept. "
              "paired: the same process times this model and the fp32 one alternately (one run each per round, who "
              "goes first alternating): the medians of the rounds, and in parentheses the median over the rounds of "
              "the two's ratio [its quartiles], so drift in the machine's speed cancels; the targets read these "
              "ratios. On the fp32 row, paired is the A/A control: fp32 against a second copy of itself, the same "
              "procedure; its quartiles are the noise floor of every other ratio. "
              "RSS: the child's peak during the step minus its RSS after importing torch, leanformer and the model's "
              "transformers architecture module (peak mark reset after those imports; the raw ru_maxrss deltas are "
              "in results.json).", ""]
    for model, unit, get in (("stories260k", "tokens/s (batch 1, greedy)", lambda d: d["tokens_per_s"]),
                             ("minilm", "ms per batch of 32", lambda d: d["ms_per_batch"])):
        rows = [r for r in lat if r["model"] == model]
        fp = next((r for r in rows if r["config"] == "fp32"), None)
        if not rows:
            continue
        lines += [f"### {model}: {unit}" + (" (fp32 = the bare dense forward, the floor)" if model == "minilm" else ""),
                  "", "| config | default | ratio to fp32 | decode | ratio | cache=True | ratio "
                  "| paired: default / fp32 (ratio [quartiles]) | RSS load MiB | RSS after default MiB | RSS after cache MiB "
                  "| disk MiB |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(rows, key=lambda r: (r["config"] != "fp32", r["config"])):
            d, c = r["default"], r.get("cache")
            ratio = lambda x: f"{x / get(fp['default']):.2f}" if fp else "—"  # noqa: E731
            cells = lambda m: f"{get(m):.2f} | {ratio(get(m))} | " if m else "— | — | "  # noqa: E731
            lines.append(f"| {r['config']} | {cells(d)}{cells(r.get('decode'))}{cells(c)}")
            pr = r.get("paired")
            lines[-1] += (f"{pr['value']:.2f} / {pr['fp32']:.2f} ({pr['ratio']:.2f}{_quartile_text(pr.get('ratio_quartiles'))}) | "
                          if pr else "— | ")
            lines[-1] += (f"{r['rss_load_mib']:.1f} | {d['rss_mib']:.1f} | {c['rss_mib']:.1f} | " if c else
                          f"{r['rss_load_mib']:.1f} | {d['rss_mib']:.1f} | — | ") + f"{r['disk']['dir_bytes'] / 2**20:.2f} |"
        lines.append("")
    single = [r for r in lat if r["model"] == "minilm" and "ms_per_sentence" in r["default"]]
    if single:
        first = single[0]["default"]
        lines += [f"### minilm: ms per sentence (batch 1: {first['sentences']} SST-2 dev sentences of "
                  f"{min(first['sentence_tokens'])}-{max(first['sentence_tokens'])} tokens, one per forward, unpadded)",
                  "", "| config | default | paired: default / fp32 (ratio [quartiles]) |", "|---|---|---|"]
        for r in sorted(single, key=lambda r: (r["config"] != "fp32", r["config"])):
            pr = r.get("paired_single")
            lines.append(f"| {r['config']} | {r['default']['ms_per_sentence']:.2f} | "
                         + (f"{pr['value']:.2f} / {pr['fp32']:.2f} ({pr['ratio']:.2f}"
                            f"{_quartile_text(pr.get('ratio_quartiles'))}) |" if pr else "— |"))
        lines.append("")
    return lines


def plots(res: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for m, panels in METRICS.items():
        rows = res["rows"][m]
        if not rows:
            continue
        fig, axes = plt.subplots(1, len(panels), figsize=(7.5 * len(panels), 5), squeeze=False)
        fp = res["fp32"][m]
        for ax, (name, get, higher, ci) in zip(axes[0], panels):
            for fam in dict.fromkeys(r["family"] for r in rows):
                pts = sorted((r for r in rows if r["family"] == fam), key=lambda r: r["bits_per_weight"])
                color, marker = FAMILY_STYLE.get(fam, ("k", "x"))
                x = [r["bits_per_weight"] for r in pts]
                y = [get(r) for r in pts]
                err = np.maximum(np.array([[get(r) - ci(r)[0], ci(r)[1] - get(r)] for r in pts]).T, 0)
                ax.errorbar(x, y, yerr=err, fmt=marker, color=color, ms=5, capsize=2, lw=0.8, label=fam)
                own = pareto_front(list(zip(x, y)), higher)  # the family's own best-at-bits curve
                ax.plot([x[i] for i in own], [y[i] for i in own], color=color, lw=1, alpha=0.7)
            front = set(res["pareto_fronts"][m][name])
            fr = sorted((r for r in rows if r["config"] in front), key=lambda r: r["bits_per_weight"])
            ax.step([r["bits_per_weight"] for r in fr], [get(r) for r in fr], where="post", color="gold", lw=4,
                    alpha=0.5, zorder=0, label="Pareto front")
            for r in fr:
                ax.annotate(r["config"], (r["bits_per_weight"], get(r)), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
            ref = get(fp) if name != "embedding cosine" else 1.0
            ax.axhline(ref, color="k", lw=0.8, ls="--", label="fp32")
            ax.set(xlabel="honest bits / weight", ylabel=name, title=f"{m}: {name}")
            if name == "TinyStories perplexity":
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(out / f"{m}_pareto.png", dpi=120)
        plt.close(fig)


if __name__ == "__main__":
    main()

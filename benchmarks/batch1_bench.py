"""Batch-1 generation speed of 3-bit models against fp32 as the model outgrows the CPU's caches: where a
token-by-token decode becomes memory-bound and low bits should pay.

Models: stories260K (the real checkpoint, 1 MiB of fp32 weights: it sits in L2), then randomly initialised
Llama models of the same architecture at hidden sizes 512, 1024 and 2048 (head 64, Llama's MLP width rule
256·⌈8h/3 / 256⌉, 512-token vocabulary so that the fp32 head stays small). Random weights: only speed is
measured here, quality is quant_bench's. Configs: quant_bench's ≤3-bit latency set (Kashin-3, RTN-3 and
HQQ-3 at group 64), each model's default forward (kernel='native').

Timing: one thread (torch and the BLAS variables), greedy `generate` from an 8-token prompt. Decode time per
token = (t(40 new tokens) − t(8 new tokens)) / 32, which leaves out the prompt's forward; end to end = t(40) / 40.
In each round the same process times fp32 and every config one after the other (the order reversed every other
round), and the ratio to fp32 is taken per round (this machine's speed drifts by tens of per cent within minutes):
median and interquartile range over the rounds, and how many rounds the config was at least as fast. A second
copy of fp32 is timed the same way: that A/A control's spread is the noise floor of every ratio. Bytes per
token: what one decode step reads of the linear layers, fp32 weights against the quantized layers' in-memory
codes (3-bit codes sit in 4-bit nibbles at run time) and metadata; fp32's GB/s is those bytes over its decode time.

  .venv/bin/python benchmarks/batch1_bench.py      # → results/batch1/, ≈ 10-20 min
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import copy  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import commit_label  # noqa: E402
from quant_bench import greedy, quantize_per_row_where_group_does_not_fit  # noqa: E402

import leanformer as lf  # noqa: E402
from leanformer.compress.quantization import QuantizedLinear  # noqa: E402
from leanformer.files import atomic_write_bytes, save_json  # noqa: E402
from leanformer.targets import select_linear  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"kashin-3": lambda: lf.Kashin(bits=3), "rtn-3-g64": lambda: lf.RTN(bits=3, group_size=64),
           "hqq-3-g64": lambda: lf.HQQ(bits=3, group_size=64)}
PROMPT_TEXT = "Once upon a time, there was a little"  # its first 8 tokens (stories260K's tokenizer; every model
                                                    # here shares its 512-token vocabulary)
SHORT, LONG = 8, 40  # new tokens of the two timed generations
CONTROL = "fp32 copy"  # the A/A control: fp32 against a second copy of itself


def llama_like(base, hidden: int, layers: int, seed: int):
    """stories260K's architecture at another width, randomly initialised (Llama's own initialiser)."""
    from transformers import LlamaForCausalLM

    config = copy.deepcopy(base.config)
    config.update({"hidden_size": hidden, "intermediate_size": 256 * math.ceil(8 * hidden / 3 / 256),
                   "num_hidden_layers": layers, "num_attention_heads": hidden // 64,
                   "num_key_value_heads": hidden // 64, "head_dim": 64})
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def linear_bytes(model) -> int:
    """Bytes one decode step reads of the layers quantize targets by default (the head is not one): fp32 weights, or
    a quantized layer's in-memory codes and metadata (the stored tensors the forward reads; the packed stream is
    not read)."""
    quantized = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    if quantized:
        return sum(t.numel() * t.element_size() for m in quantized for t in (m.codes, *m.metadata_tensors().values()))
    weights = [model.get_submodule(n).weight for n in select_linear(model, None)]
    return sum(w.numel() * w.element_size() for w in weights)


def generate_seconds(model, prompt: list[int], new_tokens: int) -> float:
    ids = torch.tensor([prompt])
    t0 = time.perf_counter()
    greedy(model, ids, new_tokens, pad_id=0)
    return time.perf_counter() - t0


def measure(label: str, fp32, prompt: list[int], rounds: int) -> dict:
    models = {"fp32": fp32, CONTROL: copy.deepcopy(fp32)}
    quantize_s = {}
    for name, make in CONFIGS.items():
        t0 = time.perf_counter()
        models[name] = copy.deepcopy(fp32)
        quantize_per_row_where_group_does_not_fit(models[name], make())  # stories260K's 172-wide layers: per row
        quantize_s[name] = time.perf_counter() - t0
    for m in models.values():  # warm-up: kernels bound, buffers allocated
        generate_seconds(m, prompt, SHORT)
    runs = {k: {"decode_ms": [], "end_to_end_ms": []} for k in models}
    for r in range(rounds):
        for name in list(models) if r % 2 == 0 else list(models)[::-1]:
            m = models[name]
            short, long = generate_seconds(m, prompt, SHORT), generate_seconds(m, prompt, LONG)
            runs[name]["decode_ms"].append((long - short) / (LONG - SHORT) * 1000)
            runs[name]["end_to_end_ms"].append(long / LONG * 1000)
        print(f"  {label} round {r + 1}/{rounds}: " + " ".join(
            f"{k} {v['decode_ms'][-1]:.2f}" for k, v in runs.items()) + " ms/token", flush=True)
    fp32_bytes = linear_bytes(fp32)
    row = {"model": label, "hidden": fp32.config.hidden_size, "layers": fp32.config.num_hidden_layers,
           "linear_weights": fp32_bytes // 4, "configs": {}}
    for name, r in runs.items():
        entry = {"bytes_per_token": linear_bytes(models[name]), "runs": r}
        for key in ("decode_ms", "end_to_end_ms"):
            entry[key] = statistics.median(r[key])
            speed = [f / q for f, q in zip(runs["fp32"][key], r[key])]  # > 1: faster than fp32 that round
            q1, _, q3 = statistics.quantiles(speed, n=4)
            entry[f"{key}_speed_vs_fp32"] = {"median": statistics.median(speed), "iqr": [q1, q3],
                                             "rounds_at_least_fp32": sum(s >= 1 for s in speed), "rounds": len(speed)}
        if name in quantize_s:
            entry["quantize_seconds"] = quantize_s[name]
        row["configs"][name] = entry
    row["fp32_gb_per_s"] = fp32_bytes / (row["configs"]["fp32"]["decode_ms"] / 1000) / 1e9
    return row


def markdown(rows: list[dict], commit: str) -> str:
    lines = ["# Batch-1 generation against fp32 as the model grows", "", f"Commit {commit}. "
             "`python benchmarks/batch1_bench.py`. One thread; greedy generation from an 8-token prompt. Speed vs "
             "fp32: fp32's time over the config's, per round (same process, alternating), median [interquartile "
             "range] (rounds at least as fast / rounds). Decode: per new token, the prompt's forward left out; end "
             "to end: 40 new tokens with the prompt. Bytes/token: what a decode step reads of the linear layers. "
             f"'{CONTROL}': the A/A control, fp32 timed against a second copy of itself, the noise floor. "
             "Random weights above stories260K: speed only.", "",
             "| model | linear weights | fp32 decode ms/token (GB/s) | config | bytes/token | decode ms/token | "
             "decode speed vs fp32 | end-to-end speed vs fp32 |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        fp = row["configs"]["fp32"]
        for name, c in row["configs"].items():
            if name == "fp32":
                continue
            d, e = c["decode_ms_speed_vs_fp32"], c["end_to_end_ms_speed_vs_fp32"]
            lines.append(
                f"| {row['model']} | {row['linear_weights'] / 1e6:.1f} M | {fp['decode_ms']:.2f} "
                f"({row['fp32_gb_per_s']:.1f}) | {name} | {c['bytes_per_token'] / 2**20:.1f} MiB of "
                f"{fp['bytes_per_token'] / 2**20:.1f} | {c['decode_ms']:.2f} | **{d['median']:.2f}** "
                f"[{d['iqr'][0]:.2f}, {d['iqr'][1]:.2f}] ({d['rounds_at_least_fp32']}/{d['rounds']}) | "
                f"{e['median']:.2f} [{e['iqr'][0]:.2f}, {e['iqr'][1]:.2f}] ({e['rounds_at_least_fp32']}/{e['rounds']}) |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, commit: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    x = [r["linear_weights"] * 4 / 2**20 for r in rows]
    for name in (*CONFIGS, CONTROL):
        med = [r["configs"][name]["decode_ms_speed_vs_fp32"]["median"] for r in rows]
        lo = [m - r["configs"][name]["decode_ms_speed_vs_fp32"]["iqr"][0] for m, r in zip(med, rows)]
        hi = [r["configs"][name]["decode_ms_speed_vs_fp32"]["iqr"][1] - m for m, r in zip(med, rows)]
        style = {"color": "grey", "linestyle": ":", "marker": "x"} if name == CONTROL else {"marker": "o"}
        ax.errorbar(x, med, yerr=[lo, hi], capsize=3, label=name, **style)
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=1, label="fp32")
    ax.set_xscale("log")
    ax.set_xlabel("fp32 linear-layer weights (MiB)")
    ax.set_ylabel("decode speed vs fp32 (x, median and IQR)")
    ax.set_title(f"batch-1 generation, one thread ({commit[:12]})", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", default="512,1024,2048", help="hidden sizes of the random models")
    ap.add_argument("--layers", type=int, default=2, help="decoder layers of each random model")
    # as quant_bench: on a machine whose speed swings by tens of per cent within minutes, more short rounds
    ap.add_argument("--rounds", type=int, default=15, help="paired timing rounds per model")
    ap.add_argument("--out", default=str(ROOT / "results" / "batch1"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    commit = commit_label()
    base, tok = lf.load("stories260k")
    prompt = tok(PROMPT_TEXT)["input_ids"][:8]
    models = [("stories260k", base.eval())]
    models += [(f"llama-h{h}-l{args.layers} (random)", llama_like(base, int(h), args.layers, seed=0))
               for h in args.hidden.split(",")]
    rows = []
    for label, model in models:
        rows.append(measure(label, model, prompt, args.rounds))
        del model
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_json(out / "results.json", {"commit": commit, "prompt_ids": prompt, "new_tokens": [SHORT, LONG],
                                     "threads": 1, "rows": rows})
    atomic_write_bytes(out / "results.md", markdown(rows, commit).encode())
    plot(rows, out / "batch1.png", commit)
    print(f"results in {out}")


if __name__ == "__main__":
    main()

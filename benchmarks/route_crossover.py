"""Where each of the fused kernels' routes stops paying: per layer shape, the time of one QuantizedLinear call by
each route, and fp32's F.linear, for 1 to 64 tokens. One thread; the best of 5 × 3 calls each. Routes:
  table   (Kashin) the codes read per token through per-vector tables, P on the input (kashin.TABLE_KERNEL_TOKENS)
          (KashinGPTQ, vectors along columns) per input its tables scaled by x_i, P on the output
          (kashin.COLUMN_TABLE_TOKENS)
  middle  (Kashin) A and B decoded a block of rows at a time, one matmul against x_c and u = Pᵀ x_c
          (up to kashin.ACTIVATION_ROUTE_TOKENS)
          (KashinGPTQ) x A and x B by blocks of decoded rows, P on the output (kashin.COLUMN_MIDDLE_TOKENS)
  codes   (RTN/HQQ) the codes multiplied per token (quantization.NATIVE_MAX_TOKENS)
  weight  the weight rebuilt once, then one matmul

  .venv/bin/python benchmarks/route_crossover.py      # → results/route_crossover/{results.json,results.md}, ≈ 3 min
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import commit_label  # noqa: E402
from quant_bench import quantize_per_row_where_group_does_not_fit  # noqa: E402

import leanformer as lf  # noqa: E402
from leanformer.compress import kashin, quantization  # noqa: E402
from leanformer.compress.quantization import QuantizedLinear  # noqa: E402
from leanformer.files import atomic_write_bytes, save_json  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOKENS = (1, 2, 4, 8, 12, 16, 24, 32, 64)
# KashinGPTQ's routes do not depend on what it was calibrated on: random token ids give its Gram matrices
CALIBRATION = [{"input_ids": torch.randint(0, 500, (8, 64), generator=torch.Generator().manual_seed(0))}]
CONFIGS = {"kashin-3": lambda: lf.Kashin(bits=3),
           "kashin-gptq-3": lambda: lf.KashinGPTQ(bits=3, calibration=CALIBRATION),
           "hqq-3-g64": lambda: lf.HQQ(bits=3, group_size=64)}
MODULES = {"kashin": kashin, "quantization": quantization}
THRESHOLDS = {f"{m}.{name}": getattr(MODULES[m], name)  # the library's, restored after
              for m, name in (("kashin", "TABLE_KERNEL_TOKENS"), ("kashin", "TABLE_ONLY_TOKENS"),
                              ("kashin", "ACTIVATION_ROUTE_TOKENS"), ("kashin", "COLUMN_TABLE_TOKENS"),
                              ("kashin", "COLUMN_MIDDLE_TOKENS"),
                              ("quantization", "NATIVE_MAX_TOKENS"))}
ROUTES = {"kashin": ("table", "middle", "weight"), "affine": ("codes", "weight")}


def best_us(fn, x, repeats: int = 5, calls: int = 3) -> float:
    fn(x)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn(x)
        best = min(best, (time.perf_counter() - t0) / calls * 1e6)
    return best


def set_route(route: str) -> None:
    """Every call by this route (a layer reads the thresholds when it binds its kernels)."""
    always, never = 10 ** 9, 0
    kashin.TABLE_KERNEL_TOKENS = kashin.TABLE_ONLY_TOKENS = kashin.COLUMN_TABLE_TOKENS = \
        always if route == "table" else never
    kashin.ACTIVATION_ROUTE_TOKENS = kashin.COLUMN_MIDDLE_TOKENS = always if route in ("table", "middle") else never
    quantization.NATIVE_MAX_TOKENS = always if route == "codes" else never


def restore_thresholds() -> None:
    for key, value in THRESHOLDS.items():
        module, name = key.split(".")
        setattr(MODULES[module], name, value)


@torch.inference_mode()
def measure(model_name: str, label: str) -> list[dict]:
    model = lf.load(model_name)[0]
    quantize_per_row_where_group_does_not_fit(model, CONFIGS[label]())
    rows, seen = [], set()
    for name, layer in model.named_modules():
        if not isinstance(layer, QuantizedLinear) or (layer.out_features, layer.in_features) in seen:
            continue
        seen.add((layer.out_features, layer.in_features))
        dense = layer.dequantize().clone()
        for tokens in TOKENS:
            x = torch.randn(tokens, layer.in_features, generator=torch.Generator().manual_seed(tokens))
            times = {}
            for route in ROUTES["kashin" if layer.method.startswith("kashin") else "affine"]:
                set_route(route)
                layer.kernel = "native"  # rebinds the kernels: the bound ones read the thresholds when bound
                times[route] = best_us(layer, x)
            times["fp32"] = best_us(lambda v: F.linear(v, dense), x)
            rows.append({"model": model_name, "config": label, "layer": name, "shape": [layer.out_features,
                                                                                         layer.in_features],
                         "tokens": tokens, **{f"{k}_us": v for k, v in times.items()}})
        print(f"  {model_name} {label} {layer.out_features}x{layer.in_features}: " + " ".join(
            f"{r['tokens']}:" + "/".join(f"{v:.0f}" for k, v in r.items() if k.endswith("_us")) for r in rows[-len(TOKENS):]),
            flush=True)
    return rows


def markdown(rows: list[dict], commit: str) -> str:
    lines = ["# The fused kernels' routes, per layer shape", "",
             f"Commit {commit}. "
             "`python benchmarks/route_crossover.py`. µs per call, one thread, best of 5 × 3 calls. Kashin: table "
             "route / middle route / weight route / fp32 F.linear; RTN/HQQ: codes route / weight route / fp32 "
             "F.linear; **bold**: the fastest quantized route. Library thresholds at this commit (tokens): "
             + ", ".join(f"{k} {v}" for k, v in THRESHOLDS.items()) + ".", ""]
    keys = sorted({(r["model"], r["config"], tuple(r["shape"])) for r in rows})
    lines += ["| model | config | shape (out x in) | " + " | ".join(f"{t} tok" for t in TOKENS) + " |",
              "|---|---|---|" + "---|" * len(TOKENS)]
    for model, config, shape in keys:
        cells = []
        for t in TOKENS:
            r = next(r for r in rows if (r["model"], r["config"], tuple(r["shape"]), r["tokens"]) ==
                     (model, config, shape, t))
            routes = [k for k in r if k.endswith("_us") and k != "fp32_us"]
            best = min(routes, key=lambda k: r[k])
            cells.append(" / ".join(f"**{r[k]:.0f}**" if k == best else f"{r[k]:.0f}" for k in routes)
                         + f" / {r['fp32_us']:.0f}")
        lines.append(f"| {model} | {config} | {shape[0]} x {shape[1]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="minilm,stories260k")
    ap.add_argument("--out", default=str(ROOT / "results" / "route_crossover"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    commit = commit_label()
    rows = []
    try:
        for model_name in args.models.split(","):
            for label in CONFIGS:
                rows += measure(model_name, label)
    finally:
        restore_thresholds()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_json(out / "results.json", {"commit": commit, "tokens": TOKENS, "rows": rows,
                                     "thresholds": THRESHOLDS})
    atomic_write_bytes(out / "results.md", markdown(rows, commit).encode())
    print(f"results in {out}")


if __name__ == "__main__":
    main()

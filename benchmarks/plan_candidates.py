"""Which candidates lf.plan should choose among: the evidence behind default_candidates().

One plan table per model and candidate set (lf.plan with that set, measured once), allocated at 2.5, 3.0 and
3.5 bits/weight and at uniform Kashin-3's honest bits/weight, each evaluated on a SELECTION split that
quant_bench.py never reads, so choosing the default here does not tune it to the bench's held-out sets:

  stories260K  perplexity on 32 windows of 256 tokens from the middle of tinystories.valid.txt (quant_bench
               reads windows from the file's start and calibrates on its last 32 stories)
  minilm       embedding cosine against fp32 on 128 SST-2 training sentences after quant_bench's held-out
               sentences and calibration texts (the same classifier, cached by quant_bench.py)

The plan calibrates on quant_bench's calibration texts, as there. Sets:

  before      Kashin (scale_bits=8), HQQ and GPTQ in groups of 64, float16 grids (the default until now)
  compact     Kashin, GPTQ in groups of 64 and per row with 8-bit scales and integer zero points
  default     compact, every GPTQ grid's range searched (clip=True): default_candidates()
  float16     default with float16 scales and minima (what the compact grids buy)
  no-kashin   default without Kashin

  .venv/bin/python benchmarks/plan_candidates.py            # → results/plan_candidates/{results.json,results.md}
  .venv/bin/python benchmarks/plan_candidates.py --models stories260k      # ≈ 4 min; minilm adds ≈ 30 min
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import copy  # noqa: E402
import dataclasses  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402


sys.path.insert(0, str(Path(__file__).resolve().parent))
import quant_bench as qb  # noqa: E402
from plan_objective import held_out, run  # noqa: E402

import leanformer as lf  # noqa: E402
from leanformer.compress.plan import default_candidates  # noqa: E402

TARGETS = (2.5, 3.0, 3.5)
BITS = (2, 3, 4)


def candidate_sets() -> dict[str, list]:
    kashin = [lf.Kashin(bits=b, scale_bits=8) for b in BITS]
    compact = {"scale_bits": 8, "zero_point": "integer"}
    default = default_candidates()
    return {
        "before": kashin + [lf.HQQ(bits=b, group_size=64) for b in BITS] + [lf.GPTQ(bits=b, group_size=64) for b in BITS],
        "compact": kashin + [lf.GPTQ(bits=b, group_size=g, **compact) for g in (64, None) for b in BITS],
        "default": default,
        "float16": [dataclasses.replace(c, scale_bits=16, zero_point="float16") if isinstance(c, lf.GPTQ) else c
                    for c in default],
        "no-kashin": [c for c in default if not isinstance(c, lf.Kashin)],
    }


def selection_data(data: dict, args) -> dict:
    """quant_bench's data with its held-out sets swapped for the selection split (module docstring)."""
    from leanformer.paths import data_root
    from leanformer.text import read_text_files

    stories = read_text_files([data_root(required=True) / "text" / "tinystories.valid.txt"])
    middle = stories[len(stories) // 2:len(stories) - args.story_calibration]
    return {**data, "windows": qb.story_windows(data["ltok"], middle, 32, args.window),
            "sentences": data["spare_sentences"][:128]}


def run_model(key: str, model, tok, calibration, data: dict, seed: int) -> list[dict]:
    model.eval()
    reference = None if key == "stories260k" else qb.embeddings(qb.encoder_of(model), tok, data["sentences"],
                                                                data["max_length"])
    rows = []

    def measure(label: str, config, extra: dict) -> dict:
        q = copy.deepcopy(model)
        lf.quantize(q, config, progress=False)
        row = {"model": key, "config": label, **extra, "bits_per_weight": lf.size_report(q).total["bits_per_weight"],
               "selection": held_out(q, reference, data, key, seed)}
        if hasattr(config, "layers"):
            row["chosen"] = sorted({config.candidates[c].method for c in config.layers.values() if c is not None})
        rows.append(row)
        s = row["selection"]
        print(f"  {key:12s} {label:28s} {row['bits_per_weight']:.3f} b/w  {s['metric']} {s['value']:.4f}", flush=True)
        return row

    kashin_bits = measure("kashin-3 (uniform)", lf.Kashin(bits=3), {})["bits_per_weight"]
    for name, candidates in candidate_sets().items():
        t0 = time.perf_counter()
        measured = lf.plan(model, 3.0, calibration=calibration, tokenizer=tok, candidates=candidates, progress=False)
        seconds = time.perf_counter() - t0
        for target in (*TARGETS, kashin_bits):
            label = f"{name} plan-{'at-kashin-3-bits' if target == kashin_bits else target}"
            measure(label, measured.with_target(target),
                    {"candidates": name, "target_bits": target, "plan_seconds": seconds})
    return rows


def markdown(rows: list[dict], commit: str) -> str:
    lines = ["# lf.plan's candidates: which set to choose among", "",
             f"Commit {commit}. `python benchmarks/plan_candidates.py`. Selection split (module docstring): "
             "stories260K perplexity on 32 windows from the middle of TinyStories valid, minilm embedding cosine "
             "on 128 SST-2 training sentences; neither is read by quant_bench.py. 95 % bootstrap intervals. "
             "`default` is lf.plan's default_candidates().", "",
             "| model | config | bits/w | selection metric [95 % CI] | methods chosen | plan s |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        s = r["selection"]
        chosen = ", ".join(r.get("chosen", [])) or "—"
        seconds = f"{r['plan_seconds']:.0f}" if "plan_seconds" in r else "—"
        lines.append(f"| {r['model']} | {r['config']} | {r['bits_per_weight']:.3f} | {s['metric']} {s['value']:.4f} "
                     f"[{s['ci'][0]:.4f}, {s['ci'][1]:.4f}] | {chosen} | {seconds} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    run(argv, __doc__.splitlines()[0], "plan_candidates", run_model, markdown, selection_data)


if __name__ == "__main__":
    main()

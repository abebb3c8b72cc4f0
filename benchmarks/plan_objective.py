"""Which objective lf.plan should minimise: the evidence behind its defaults.

One plan table per model (every default candidate on every layer, measured once with both errors and the
block influence: lf.plan(..., use_profile=True)), then one allocation per objective, sensitivity and budget:

  objective   Σ e_i        the sum of the layers' errors (lf.plan's default)
              Σ s·e_i      × block influence over its mean (use_profile=True)
              Σ n·e_i      × the layer's weight count (lf.plan before this script)
              Σ n·s·e_i    both (lf.plan's former default)
  sensitivity output       e_i = relative change of the final hidden states with layer i alone quantized
              layer        e_i = layer i's relative output error on its calibration inputs (stories260K only:
                           on minilm each allocation costs a minute to evaluate)
  budget      3.0 bits/weight, and uniform Kashin-3's honest bits/weight on that model

Per allocation: its honest bits/weight, the additive prediction Σ e_i (final-state errors), the joint change
of the final hidden states on the calibration tokens with every planned layer quantized (the quantity the
objectives estimate, measured on the calibration split), and the held-out metric of quant_bench.py
(stories260K perplexity on its TinyStories windows, minilm embedding cosine on its held-out SST-2 sentences)
with a 95 % bootstrap interval. Uniform Kashin-3 is the reference row.

  .venv/bin/python benchmarks/plan_objective.py            # → results/plan_objective/{results.json,results.md}
  .venv/bin/python benchmarks/plan_objective.py --models stories260k      # ≈ 3 min; minilm adds ≈ 25 min
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import copy  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quant_bench as qb  # noqa: E402
from provenance import commit_label  # noqa: E402

import leanformer as lf  # noqa: E402
from leanformer.compress.calibration import calibration_batches  # noqa: E402
from leanformer.compress.plan import PlanConfig, QuantPlan, _FinalStates  # noqa: E402
from leanformer.files import atomic_write_bytes, save_json  # noqa: E402

OBJECTIVES = {  # name → (use_profile, weight the errors by the layer's weight count)
    "Σ e": (False, False), "Σ s·e": (True, False), "Σ n·e": (False, True), "Σ n·s·e": (True, True)}
ERROR_KEYS = ("final_error", "output_error")


def allocation(measured: QuantPlan, target: float, objective: str, sensitivity: str) -> QuantPlan:
    """measured.with_target under one objective. The size-weighted ones (no longer lf.plan's) scale every
    error in a copy of the table by its layer's weight count, which with_target then allocates."""
    use_profile, by_size = OBJECTIVES[objective]
    source = measured
    if by_size:
        table = copy.deepcopy(measured.table)
        for row in table.values():
            for m in row["candidates"].values():
                for key in ERROR_KEYS:
                    if key in m:
                        m[key] *= row["n_weights"]
        source = QuantPlan(measured.target_bits, measured.candidates, measured.layers, table,
                           measured.average_bits, measured.info)
    chosen = source.with_target(target, use_profile=use_profile, sensitivity=sensitivity)
    # the measured table (unscaled) with the chosen layers: what the prediction below reads
    return QuantPlan(target, measured.candidates, chosen.layers, measured.table, chosen.average_bits, chosen.info)


def held_out(model, reference, data: dict, key: str, seed: int) -> dict:
    if key == "stories260k":
        q = qb.stories_quality(model, data, None, seed)
        return {"metric": "perplexity", "value": q["perplexity"], "ci": q["ci"]}
    emb = qb.embeddings(qb.encoder_of(model), data["tok"], data["sentences"], data["max_length"])
    cos = torch.nn.functional.cosine_similarity(emb, reference, dim=1).double().numpy()
    return {"metric": "embedding cosine", "value": float(cos.mean()),
            "ci": qb.bootstrap(lambda i: cos[i].mean(), len(cos), seed)}


def joint_change(model, reference: _FinalStates) -> float:
    """‖H' − H‖² / ‖H‖² of the final hidden states over the calibration tokens, every planned layer quantized."""
    changed = _FinalStates(model, reference.batches).reference
    diff = sum(float((a.double() - b.double()).pow(2).sum()) for a, b in zip(changed, reference.reference))
    return diff / reference.energy


def run_model(key: str, model, tok, calibration, data: dict, seed: int) -> list[dict]:
    model.eval()
    t0 = time.perf_counter()
    measured = lf.plan(model, 3.0, calibration=calibration, tokenizer=tok, use_profile=True, progress=True)
    print(f"{key}: plan table in {time.perf_counter() - t0:.0f} s", flush=True)
    reference = _FinalStates(model, calibration_batches(calibration, tok, PlanConfig(), "plan"))
    ref_emb = None if key == "stories260k" else qb.embeddings(qb.encoder_of(model), tok, data["sentences"],
                                                              data["max_length"])
    rows = []

    def measure(label: str, config, extra: dict) -> None:
        q = copy.deepcopy(model)
        lf.quantize(q, config, progress=False)
        row = {"model": key, "config": label, **extra, "bits_per_weight": lf.size_report(q).total["bits_per_weight"],
               "joint_calibration_change": joint_change(q, reference),
               "held_out": held_out(q, ref_emb, data, key, seed)}
        if isinstance(config, QuantPlan):
            row["predicted_sum_final_error"] = sum(measured.table[n]["candidates"][c]["final_error"]
                                                   for n, c in config.layers.items() if c is not None)
            row["layers"] = config.layers
        rows.append(row)
        h = row["held_out"]
        print(f"  {key:12s} {label:34s} {row['bits_per_weight']:.3f} b/w  joint {row['joint_calibration_change']:.4f}"
              f"  {h['metric']} {h['value']:.4f}", flush=True)

    measure("kashin-3 (uniform)", lf.Kashin(bits=3), {})
    kashin_bits = rows[-1]["bits_per_weight"]
    for sensitivity in ("output", "layer") if key == "stories260k" else ("output",):
        for target in (3.0, kashin_bits):
            for objective in OBJECTIVES:
                measure(f"plan {target:.3f} {sensitivity} {objective}", allocation(measured, target, objective,
                                                                                   sensitivity),
                        {"target_bits": target, "sensitivity": sensitivity, "objective": objective})
    return rows


def markdown(rows: list[dict], commit: str) -> str:
    lines = ["# lf.plan's objective: which sum of per-layer errors to minimise", "",
             f"Commit {commit}. "
             "`python benchmarks/plan_objective.py`. One plan table per model (default candidates), one allocation "
             "per row. joint = the relative change of the final hidden states on the plan's calibration tokens with "
             "every planned layer quantized (what the objectives estimate); predicted = Σ of the chosen candidates' "
             "single-layer final-state errors; held-out = quant_bench.py's metric with a 95 % bootstrap interval. "
             "Σ e is lf.plan's default; Σ n·s·e was its default before.", "",
             "| model | config | bits/w | predicted Σ e | joint (calibration) | held-out [95 % CI] |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        h = r["held_out"]
        pred = f"{r['predicted_sum_final_error']:.4f}" if "predicted_sum_final_error" in r else "—"
        lines.append(f"| {r['model']} | {r['config']} | {r['bits_per_weight']:.3f} | {pred} | "
                     f"{r['joint_calibration_change']:.4f} | {h['metric']} {h['value']:.4f} "
                     f"[{h['ci'][0]:.4f}, {h['ci'][1]:.4f}] |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    run(argv, __doc__.splitlines()[0], "plan_objective", run_model, markdown)


def run(argv, description: str, name: str, run_model, markdown, prepare=lambda data, setup: data) -> None:
    """The command line shared with plan_candidates.py: each of --models through run_model(key, model, tokenizer,
    calibration, data, seed) on quant_bench's data and models with its defaults (the same held-out sets and
    calibration texts; `prepare` may swap the sets), then results.json and markdown(rows, commit) as results.md
    in --out (default results/<name>)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--models", default="stories260k,minilm", help="comma-separated: stories260k, minilm")
    ap.add_argument("--out", default=str(qb.ROOT / "results" / name))
    ap.add_argument("--cache", default=None, help="quant_bench's cache (the fine-tuned minilm classifier)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    setup = qb.parser().parse_args(["--seed", str(args.seed), "--cache", args.cache or str(qb.CACHE)])
    Path(setup.cache).mkdir(parents=True, exist_ok=True)
    data = prepare(qb.full_setup(setup), setup)
    commit = commit_label()
    rows = []
    for key in args.models.split(","):
        if key == "stories260k":
            rows += run_model(key, data["llama"], data["ltok"], data["story_calibration"], data, args.seed)
        elif key == "minilm":
            rows += run_model(key, data["clf"], data["tok"], data["calibration"], data, args.seed)
        else:
            raise SystemExit(f"unknown model {key!r}: choose stories260k, minilm")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_json(out / "results.json", {"commit": commit, "rows": rows, "settings": vars(setup)})
    atomic_write_bytes(out / "results.md", markdown(rows, commit).encode())
    print(f"results in {out}")


if __name__ == "__main__":
    main()

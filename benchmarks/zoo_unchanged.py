"""Architecture-awareness must not move the headline figures of the two real models: re-run the
deterministic parts of the recorded benchmarks on minilm and stories260K and compare.

    python benchmarks/zoo_unchanged.py      # writes results/zoo/unchanged.json

  profiles   `leanformer inspect` of minilm (default corpus) and stories260K (TinyStories valid), as
             benchmarks/profiles_bench.py runs them, against results/profiles/*/metrics.json: the
             largest absolute difference over every per-layer and per-block metric both files hold;
  prune      the calibration scores (linearity, block influence, angular) of every run of 1 and 2
             blocks, and the quality after dropping / linearly replacing, as benchmarks/prune_bench.py
             computes them, against results/prune/results.json;
  quant      a subset of benchmarks/quant_bench.py's configurations (all its deterministic columns:
             bits per weight, weight errors, embedding cosine, SST-2 accuracy, perplexity) against
             results/quant/results.json; quantize seconds are timings and are not compared;
  targets    the adapter layers LoRA() picks by default on minilm and stories260K, against the
             previous explicit default (query, value), and its initial tensors under the same seed;
  capture    a hash of everything capture() returns (hidden states, last-token rows, MLP near-zero
             counts) on both models, from this tree and from the code at --against (git archive):
             what inspect and prune read, separated from changes to the metrics themselves.

Every recorded file is read as committed at --against (git show), so benchmarks re-run since do not
move the reference. Sections run are merged into an existing unchanged.json (--skip leaves the others
as they were).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from provenance import git_state

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
OUT = ROOT / "results" / "zoo" / "unchanged.json"
QUANT_SUBSET = ("kashin-4", "rtn-4-g128", "hqq-4-g64", "hqq-3-row")


AGAINST = "64692f6"  # the last commit before architecture-awareness: its code and its recorded results


def recorded(path: str, revision: str | None = None) -> dict:
    """A results file as committed at `revision` (default AGAINST), not as the working tree has it now:
    other benchmarks may have rewritten it since."""
    text = subprocess.run(["git", "show", f"{revision or AGAINST}:{path}"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout
    return json.loads(text)


def max_diff(new, old, path="") -> tuple[float, str, int]:
    """(largest |new − old| over the numbers both hold at the same place, where, how many compared)."""
    if isinstance(new, bool) or isinstance(old, bool):
        return 0.0, "", 0
    if isinstance(new, (int, float)) and isinstance(old, (int, float)):
        return abs(float(new) - float(old)), path, 1
    worst, where, n = 0.0, "", 0
    if isinstance(new, dict) and isinstance(old, dict):
        pairs = [(new[k], old[k], f"{path}.{k}") for k in new if k in old]
    elif isinstance(new, list) and isinstance(old, list) and len(new) == len(old):
        pairs = [(a, b, f"{path}[{i}]") for i, (a, b) in enumerate(zip(new, old))]
    else:
        return 0.0, "", 0
    for a, b, p in pairs:
        d, w, k = max_diff(a, b, p)
        n += k
        if d > worst:
            worst, where = d, w
    return worst, where, n


def check_profiles(root: Path, tokens: int) -> dict:
    from leanformer.cli import main as cli

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in (("minilm", []), ("stories260k", ["--text", str(root / "text" / "tinystories.valid.txt")])):
            cli(["inspect", name, *text, "--tokens", str(tokens), "--out", f"{tmp}/{name}", "--overwrite"])
            new = json.loads(Path(f"{tmp}/{name}/metrics.json").read_text())
            old = recorded(f"results/profiles/{name}/metrics.json")
            d, where, n = max_diff({k: new[k] for k in ("n_tokens", "layers", "transitions")},
                                   {k: old[k] for k in ("n_tokens", "layers", "transitions")})
            per_metric = {}
            for part in ("layers", "transitions"):
                for metric in sorted({k for row in new[part] for k in row} & {k for row in old[part] for k in row}):
                    per_metric[f"{part}.{metric}"] = max_diff([row.get(metric) for row in new[part]],
                                                              [row.get(metric) for row in old[part]])[0]
            out[name] = {"max_abs_diff": d, "at": where, "numbers_compared": n, "max_abs_diff_per_metric": per_metric}
            print(f"profile {name}: max |Δ| {d:.3g} at {where} over {n} numbers", flush=True)
    return out


def check_prune(root: Path) -> dict:
    import prune_bench

    old = recorded("results/prune/results.json")["models"]
    out = {}
    for name, setup in (("stories260k", lambda: prune_bench.setup_stories(root, 32768)),
                        ("minilm", lambda: prune_bench.setup_minilm(root, 872))):
        rows, summary = prune_bench.bench_model(name, setup, 8192)
        d, where, n = max_diff(rows, old[name]["rows"])
        ds, wheres, ns = max_diff({k: summary[k] for k in ("base_quality", "spearman", "chosen", "best")},
                                  {k: old[name]["summary"][k] for k in ("base_quality", "spearman", "chosen", "best")})
        out[name] = {"rows_max_abs_diff": d, "rows_at": where, "rows_numbers_compared": n,
                     "summary_max_abs_diff": ds, "summary_at": wheres, "summary_numbers_compared": ns}
        print(f"prune {name}: rows max |Δ| {d:.3g} at {where} ({n}); summary {ds:.3g} at {wheres} ({ns})", flush=True)
    return out


def check_quant(subset) -> dict:
    import quant_bench

    old = {r["config"]: r for r in recorded("results/quant/results.json")["rows"]}
    with tempfile.TemporaryDirectory() as tmp:
        quant_bench.main(["--out", tmp, "--only", *subset])
        new = {r["config"]: r for r in json.loads((Path(tmp) / "results.json").read_text())["rows"]}
    timing = ("minilm_quantize_seconds", "stories_quantize_seconds")
    out = {}
    for label in subset:
        a = {k: v for k, v in new[label].items() if k not in timing}
        b = {k: v for k, v in old[label].items() if k not in timing}
        d, where, n = max_diff(a, b)
        out[label] = {"max_abs_diff": d, "at": where, "numbers_compared": n,
                      "settings_equal": new[label]["settings"] == old[label]["settings"]}
        print(f"quant {label}: max |Δ| {d:.3g} at {where} over {n} numbers", flush=True)
    return out


def check_targets() -> dict:
    import leanformer as lf

    out = {}
    for name, head, explicit in (("minilm", "sequence-classification", ["query", "value"]),
                                 ("stories260k", "causal-lm", ["q_proj", "v_proj"])):
        states = []
        for targets in (None, explicit):
            model, _ = lf.load(name, head=head, num_labels=2 if head != "causal-lm" else None)
            torch.manual_seed(0)
            lf.adapt(model, lf.LoRA(targets=targets))
            entry = lf.applied(model)[-1]
            states.append((entry.config.targets, entry.state["layers"],
                           {k: v.clone() for k, v in model.state_dict().items() if ".adapters." in k}))
        (t_default, layers_default, sd_default), (_, layers_explicit, sd_explicit) = states
        from leanformer.cli.finetune import FinetuneArguments, build_config

        model, _ = lf.load(name, head="sequence-classification", num_labels=2)
        cli_targets = build_config(FinetuneArguments(task="unused", out="unused"), "classifier", model).targets
        out[name] = {"default_targets": t_default, "finetune_cli_default_targets": cli_targets,
                     "same_layers_as_explicit": layers_default == layers_explicit,
                     "n_layers": len(layers_default),
                     "same_initial_adapter_tensors": sd_default.keys() == sd_explicit.keys()
                     and all(torch.equal(sd_default[k], sd_explicit[k]) for k in sd_default)}
        print(f"targets {name}: {out[name]}", flush=True)
    return out


def capture_hash() -> dict:
    """sha256 of capture()'s outputs on 4096 tokens of each model's text (run in a child process
    whose PYTHONPATH picks the code)."""
    import leanformer.capture as C
    from leanformer.models import load_pretrained
    from leanformer.paths import data_root
    from leanformer.text import default_corpus, pad_batch, token_chunks

    out = {}
    for name in ("minilm", "stories260k"):
        model, tok = load_pretrained(name)
        texts = (open(data_root() / "text" / "tinystories.valid.txt").read().split("\n\n")[:200]
                 if name == "stories260k" else default_corpus())
        chunks = token_chunks(tok, texts, max_length=128, tokens=4096)
        h = hashlib.sha256()
        for i in range(0, len(chunks), 16):
            states, last, near_zero = C.capture(model, pad_batch(tok, chunks[i:i + 16]), mlp_eps=0.01)
            for s in states:
                h.update(s.numpy().tobytes())
            h.update(last.numpy().tobytes())
            h.update(repr(near_zero).encode())
        out[name] = h.hexdigest()
    return out


def check_capture(against: str) -> dict:
    code = "import json, sys, torch; torch.set_num_threads(1); sys.path.insert(0, 'benchmarks'); " \
           "import zoo_unchanged; print(json.dumps(zoo_unchanged.capture_hash()))"
    hashes = {}
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "archive", against, "src"], cwd=ROOT, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        for label, src in (("this tree", ROOT / "src"), (against, Path(tmp) / "src")):
            env = {**os.environ, "PYTHONPATH": str(src)}
            proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"capture hash with {label} failed:\n{proc.stderr[-2000:]}")
            hashes[label] = json.loads(proc.stdout.strip().splitlines()[-1])
    out = {"against": against, "hashes": hashes, "identical": hashes["this tree"] == hashes[against]}
    print(f"capture: identical to {against}: {out['identical']}", flush=True)
    return out


def main() -> None:
    global AGAINST
    from leanformer.paths import data_root

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--skip", nargs="*", default=[], choices=["profiles", "prune", "quant", "targets", "capture"])
    p.add_argument("--against", default=AGAINST, help="git revision before architecture-awareness: the code the "
                   "capture check runs and the recorded results every check compares with")
    args = p.parse_args()
    root = data_root(required=True)
    AGAINST = args.against
    torch.set_num_threads(1)
    result = json.loads(OUT.read_text()) if OUT.is_file() else {}
    result.update(**git_state("README.md"), against=AGAINST)
    command = "python benchmarks/zoo_unchanged.py " + " ".join(sys.argv[1:])
    earlier = [result.pop("command")] if "command" in result else []  # files written before sections merged
    result["commands"] = list(dict.fromkeys([*(c.strip() for c in earlier), *result.get("commands", []),
                                             command.strip()]))
    if "capture" not in args.skip:
        result["capture"] = check_capture(args.against)
    if "targets" not in args.skip:
        result["targets"] = check_targets()
    if "profiles" not in args.skip:
        result["profiles"] = check_profiles(root, 16384)
    if "prune" not in args.skip:
        torch.manual_seed(0)
        result["prune"] = check_prune(root)
    if "quant" not in args.skip:
        result["quant"] = check_quant(QUANT_SUBSET)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()

"""leanformer eval MODEL_OR_DIR (--task TASK | --text PATH... | --dataset NAME) — task metrics,
perplexity, or embedding agreement with a reference model; writes DIR/metrics.json."""
from __future__ import annotations

import time
from pathlib import Path

from ..errors import LeanformerError
from ..evaluation import EvalConfig
from ..files import load_json
from ._common import add_device, add_out, add_text_source, check_device
from ._config_args import add_config_arguments, config_from_args

COMMAND = "eval"
HELP = "evaluate a model or leanformer output dir: task metrics, perplexity, or embedding cosine"


def add_arguments(p) -> None:
    p.add_argument("model", metavar="MODEL_OR_DIR", help="alias, HF directory, or a leanformer output directory")
    p.add_argument("--task", help="GLUE-format dir, 'TRAIN,DEV' CSV/JSONL pair, or HF dataset name")
    add_text_source(p, ": perplexity (causal LMs) or embedding cosine to --reference (encoders)", default=None)
    p.add_argument("--reference", help="encoders with --text: model to compare embeddings with "
                                       "(default: the base model a leanformer directory records)")
    add_config_arguments(p, EvalConfig)
    tau = p.add_mutually_exclusive_group()
    tau.add_argument("--tau", type=float, metavar="τ", help="dynamic models (moefied, early exit): evaluate at this "
                     "threshold in [0, 1] (routing threshold / exit threshold) and report executed FLOPs and latency")
    tau.add_argument("--tau-sweep", type=float, nargs="*", metavar="τ", help="dynamic models: evaluate at each τ (no "
                     "values: 1, 0.99, 0.95, 0.9, 0.8, 0.6, 0.4, 0.2, 0); with --out, writes tau_sweep.md and "
                     "tau_sweep.png (quality against FLOPs per token)")
    add_out(p, required=False)
    add_device(p)


def _recorded_base(path: str) -> str | None:
    marker = Path(path) / "leanformer.json"
    return (load_json(marker).get("base") or {}).get("name_or_path") if marker.is_file() else None


def run(args) -> int:
    from ..evaluation import evaluate
    from ..files import output_dir, save_json
    from ..models import is_causal_lm
    from ..adapters import trainable_parameters
    from ..runtime import peak_rss_mb
    from ..saving import load
    from ..tasks import load_task
    from ..text import get_texts

    config = config_from_args(EvalConfig, args)  # bad values fail before the model loads
    device = check_device(args.device)
    if bool(args.task) == bool(args.text or args.dataset):
        raise LeanformerError("give exactly one of --task or --text/--dataset")
    if args.tau is not None or args.tau_sweep:  # bad τ fails before the model loads
        from ..dynamic import check_tau
        for tau in [args.tau] if args.tau is not None else args.tau_sweep:
            check_tau(tau)
    started = time.perf_counter()
    model, tokenizer = load(args.model, device=device)
    if args.tau is not None or args.tau_sweep is not None:
        return _run_dynamic(args, model, tokenizer, config, started)
    reference, ref_model = None, None
    if args.task:
        result = evaluate(model, tokenizer, config, task=load_task(args.task))
    else:
        texts = get_texts(args.text, args.dataset)
        if not is_causal_lm(model):
            reference = args.reference or _recorded_base(args.model)
            if reference is None:
                raise LeanformerError(f"{type(model).__name__} is an encoder: pass --reference MODEL to compare "
                                      "sentence embeddings (perplexity needs a causal LM)")
            ref_model, _ = load(reference, head="base", device=device)
        result = evaluate(model, tokenizer, config, texts=texts, reference=ref_model)
        if reference is not None:
            result["reference"] = reference
    counts = trainable_parameters(model)
    metrics = {"model": str(args.model), **result, "trainable_params": counts["trainable"],
               "total_params": counts["total"],
               "train_seconds_per_step": None, "eval_seconds": time.perf_counter() - started,
               "peak_rss_mb": peak_rss_mb()}
    for k, v in metrics.items():
        print(f"{k:>24}: {v:.4f}" if isinstance(v, float) else f"{k:>24}: {v}")
    if args.out:
        with output_dir(args.out, overwrite=args.overwrite) as staging:
            save_json(staging / "metrics.json", metrics)
        print(f"wrote {Path(args.out) / 'metrics.json'}")
    return 0


def _run_dynamic(args, model, tokenizer, config, started: float) -> int:
    """--tau / --tau-sweep: quality, executed FLOPs (fractions of dense) and forward wall time per τ."""
    from ..adapters import trainable_parameters
    from ..dynamic import kind_of
    from ..dynamic.sweep import DEFAULT_TAUS, tau_sweep, sweep_table, write_sweep
    from ..files import output_dir, save_json
    from ..runtime import peak_rss_mb
    from ..tasks import load_task
    from ..text import get_texts

    kind = kind_of(model)  # names what was looked for when the model is not dynamic
    if args.reference:
        raise LeanformerError("--reference does not combine with --tau / --tau-sweep (they report task metrics or "
                              "perplexity)")
    taus = [args.tau] if args.tau is not None else (args.tau_sweep or list(DEFAULT_TAUS))
    task = load_task(args.task) if args.task else None
    texts = None if task else get_texts(args.text, args.dataset)
    rows = tau_sweep(model, tokenizer, taus, config, task=task, texts=texts)
    counts = trainable_parameters(model)
    metrics = {"model": str(args.model), "dynamic": kind.transform, "tau_means": kind.tau_means, **rows[0],
               "trainable_params": counts["trainable"], "total_params": counts["total"],
               "train_seconds_per_step": None, "eval_seconds": time.perf_counter() - started,
               "peak_rss_mb": peak_rss_mb()}
    if args.tau_sweep is not None:
        metrics["sweep"] = rows
        print(sweep_table(rows), end="")
    else:
        for k, v in metrics.items():
            print(f"{k:>24}: {v:.4f}" if isinstance(v, float) else f"{k:>24}: {v}")
    if args.out:
        with output_dir(args.out, overwrite=args.overwrite) as staging:
            save_json(staging / "metrics.json", metrics)
            if args.tau_sweep is not None:
                write_sweep(rows, staging, f"{Path(str(args.model)).name}: {kind.transform}")
        print(f"wrote {Path(args.out) / 'metrics.json'}" + (" and tau_sweep.md / .png" if args.tau_sweep is not None
                                                             else ""))
    return 0

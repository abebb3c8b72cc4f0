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
    started = time.perf_counter()
    model, tokenizer = load(args.model, device=device)
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

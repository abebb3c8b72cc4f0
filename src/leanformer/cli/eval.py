"""leanformer eval MODEL_OR_DIR (--task TASK | --text PATH...) — task metrics, perplexity, or
embedding agreement with a reference model; writes DIR/metrics.json."""
from __future__ import annotations

import json
import time
from pathlib import Path

from ..errors import LeanformerError
from ._common import add_device, add_out, add_text_source, check_device

COMMAND = "eval"
HELP = "evaluate a model or leanformer output dir: task metrics, perplexity, or embedding cosine"


def add_arguments(p) -> None:
    p.add_argument("model", metavar="MODEL_OR_DIR", help="alias, HF directory, or a leanformer output directory")
    p.add_argument("--task", help="GLUE-format dir, 'TRAIN,DEV' CSV/JSONL pair, or HF dataset name")
    add_text_source(p)
    p.add_argument("--reference", help="encoders with --text: model to compare embeddings with "
                                       "(default: the base model a leanformer directory records)")
    p.add_argument("--max-eval-samples", type=int, help="evaluate on the first N examples / texts")
    p.add_argument("--max-seq-length", type=int, default=128)
    p.add_argument("--stride", type=int, help="perplexity window stride (default: half the window)")
    p.add_argument("--batch-size", type=int, default=32)
    add_out(p, required=False)
    add_device(p)


def _recorded_base(path: str) -> str | None:
    marker = Path(path) / "leanformer.json"
    return (json.loads(marker.read_text()).get("base") or {}).get("name_or_path") if marker.is_file() else None


def run(args) -> int:
    from .. import evaluation
    from ..saving import load
    from ..tasks import load_task
    from ..text import get_texts
    from ..files import output_dir, save_json
    from ..models import is_causal_lm
    from ..runtime import count_parameters, peak_rss_mb

    device = check_device(args.device)
    if bool(args.task) == bool(args.text or args.dataset):
        raise LeanformerError("give exactly one of --task or --text/--dataset")
    if args.max_eval_samples is not None and args.max_eval_samples <= 0:
        raise LeanformerError(f"--max-eval-samples must be positive, got {args.max_eval_samples}")
    started = time.perf_counter()
    model, tokenizer = load(args.model, device=device)
    if args.task:
        task = load_task(args.task)
        result = evaluation.evaluate_task(model, tokenizer, task, batch_size=args.batch_size,
                                        max_length=args.max_seq_length, max_samples=args.max_eval_samples)
        result["task"] = task.name
    else:
        texts = get_texts(args.text, args.dataset)[: args.max_eval_samples]
        if is_causal_lm(model):
            result = evaluation.perplexity(model, tokenizer, texts, max_length=args.max_seq_length, stride=args.stride,
                                         batch_size=args.batch_size)
        else:
            reference = args.reference or _recorded_base(args.model)
            if reference is None:
                raise LeanformerError(f"{type(model).__name__} is an encoder: pass --reference MODEL to compare "
                                      "sentence embeddings (perplexity needs a causal LM)")
            ref_model, _ = load(reference, head="base", device=device)
            result = evaluation.embedding_cosine(model, ref_model, tokenizer, texts, args.batch_size, args.max_seq_length)
            result["reference"] = reference
    trainable, total = count_parameters(model)
    metrics = {"model": str(args.model), **result, "trainable_params": trainable, "total_params": total,
               "train_seconds_per_step": None, "eval_seconds": time.perf_counter() - started,
               "peak_rss_mb": peak_rss_mb()}
    for k, v in metrics.items():
        print(f"{k:>24}: {v:.4f}" if isinstance(v, float) else f"{k:>24}: {v}")
    if args.out:
        with output_dir(args.out, overwrite=args.overwrite) as staging:
            save_json(staging / "metrics.json", metrics)
        print(f"wrote {Path(args.out) / 'metrics.json'}")
    return 0

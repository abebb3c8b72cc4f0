"""leanformer compress MODEL --method kashin|rtn|hqq [--bits B] [--group-size G] [--targets ...] --out DIR
leanformer compress MODEL --method gptq|kashin-gptq [--bits B] [--task T | --text PATH... | --dataset NAME] --out DIR
leanformer compress MODEL --target-bits B [--task T | --text PATH... | --dataset NAME] [--method M] --out DIR

The flags are the union of the methods' config fields (Kashin, RTN, HQQ, GPTQ, KashinGPTQ); a flag left out keeps
the chosen method's own default. GPTQ and KashinGPTQ read calibration text (the same sources and --tokens,
--max-seq-length and --batch-size as a plan; default: the built-in corpus). With --target-bits, a
plan (lf.plan) picks each layer's method and bits from measured sensitivity so the average honest
bits/weight stays within B; --method then restricts the candidates to that method at 2, 3 and 4 bits
(its other flags shape them), and the plan is printed and saved as plan.json next to the model."""
from __future__ import annotations

from pathlib import Path

from ..compress.plan import PlanConfig
from ..compress.quantization import METHODS
from ..errors import LeanformerError
from ..files import OutputDirError
from ._common import add_device, add_out, add_text_source, check_device
from ._config_args import add_config_arguments, cli_fields, config_from_args, flag_name, given

COMMAND = "compress"
HELP = "quantize a model's Linear layers (Kashin, RTN, HQQ, GPTQ or KashinGPTQ) and save it with packed indices"

ORDER = ("kashin", "rtn", "hqq", "gptq", "kashin-gptq")  # flag order and help order; every registered method is offered
PLAN_BITS = (2, 3, 4)  # the widths a --target-bits plan offers each layer when --method names one method
SHARED = ("targets", "cache")  # QuantConfig fields every method has: with --target-bits they apply to every candidate
READING = ("tokens", "max_seq_length", "batch_size")  # PlanConfig's flags for reading calibration, which the calibrated methods share


def _methods() -> dict[str, type]:
    return {m: METHODS[m] for m in sorted(METHODS, key=lambda m: (ORDER.index(m) if m in ORDER else len(ORDER), m))}


def add_arguments(p) -> None:
    methods = _methods()
    p.add_argument("model", metavar="MODEL", help="alias (minilm, stories260k), HF directory, or hub id")
    p.add_argument("--method", choices=list(methods),
                   help="quantization method (required without --target-bits; with it, the plan chooses only among "
                        f"this method at {', '.join(map(str, PLAN_BITS))} bits)")
    add_config_arguments(p, *methods.values(), labels={cls: name for name, cls in methods.items()})
    plan = p.add_argument_group("per-layer plan (--target-bits)")
    plan.add_argument("--target-bits", type=float, metavar="B",
                      help="choose method and bits per layer from measured sensitivity so the average honest "
                           "bits/weight (every stored byte counted) is at most B; the plan is saved as plan.json")
    plan.add_argument("--task", help="with --target-bits (or a calibrated --method: gptq, kashin-gptq): calibrate on "
                                     "this task's training split "
                                     "(GLUE-format dir, 'TRAIN,DEV' pair, or HF dataset name)")
    add_text_source(plan, " to calibrate on, with --target-bits (or --method gptq, kashin-gptq)")
    add_config_arguments(plan, PlanConfig)
    add_out(p)
    add_device(p)


def _foreign_flags_error(args, cls, method: str) -> None:
    """A flag of another method is an error, not ignored."""
    own = set(given(args, cls))
    foreign = {}
    for name, other in _methods().items():
        for field_name in given(args, other):
            if field_name not in own:
                foreign.setdefault(field_name, []).append(name)
    if foreign:
        wrong = "; ".join(f"--{f.replace('_', '-')} applies to {', '.join(ms)}" for f, ms in foreign.items())
        takes = ", ".join(flag_name(f) for f in cli_fields(cls))
        raise LeanformerError(f"{wrong}, not to --method {method}; {method} takes {takes}")


def build_config(args):
    """The chosen method's config from the flags; a flag of another method is an error, not ignored."""
    cls = _methods()[args.method]
    _foreign_flags_error(args, cls, args.method)
    return config_from_args(cls, args)


def _plan_flags(args, calibrated: bool = False) -> list[str]:
    """The plan flags given; with `calibrated` (a method that reads calibration text itself) less the ones
    that say what text to read and how."""
    given_ = ["--target-bits"] if args.target_bits is not None else []
    if not calibrated:
        given_ += [f for f, v in (("--task", args.task), ("--text", args.text), ("--dataset", args.dataset)) if v]
    return given_ + [flag_name(f) for f in cli_fields(PlanConfig)
                     if hasattr(args, f.name) and not (calibrated and f.name in READING)]


def _calibration(args):
    """The calibration input the flags name (a missing file or task fails here, before the model loads)."""
    from ..tasks import load_task
    from ..text import get_texts

    if args.task and (args.text or args.dataset):
        raise LeanformerError("give one of --task (its training split calibrates) or --text/--dataset, not both")
    return load_task(args.task) if args.task else get_texts(args.text, args.dataset)


def build_candidates(args) -> tuple[list, PlanConfig]:
    """(the plan's candidates, its PlanConfig) from the flags: --method's configs at PLAN_BITS shaped by its
    flags, else lf.plan's default set; --targets picks the layers, --cache applies to every candidate."""
    from dataclasses import replace

    from ..compress.plan import default_candidates

    shared = {k: v for cls in _methods().values() for k, v in given(args, cls).items() if k in SHARED}
    config = config_from_args(PlanConfig, args, **({"targets": shared["targets"]} if "targets" in shared else {}))
    cache = {"cache": shared["cache"]} if "cache" in shared else {}
    if args.method is None:
        shaping = sorted({flag_name(f) for cls in _methods().values() for f in cli_fields(cls)
                          if hasattr(args, f.name) and f.name not in SHARED})
        if shaping:
            raise LeanformerError(f"{', '.join(shaping)} shape one method's candidates; with --target-bits add --method "
                                  f"({', '.join(_methods())}), or leave them out for the default candidates")
        return [replace(c, **cache) for c in default_candidates()], config
    cls = _methods()[args.method]
    _foreign_flags_error(args, cls, args.method)
    if hasattr(args, "bits"):
        raise LeanformerError(f"--bits fixes one width for every layer; with --target-bits the plan chooses among "
                              f"{', '.join(map(str, PLAN_BITS))} bits per layer: leave --bits out")
    flags = {k: v for k, v in given(args, cls).items() if k != "targets"}
    try:
        candidates = [cls(**{**flags, "bits": b}) for b in PLAN_BITS if b in cls.SUPPORTED_BITS]
    except LeanformerError as e:
        raise LeanformerError(f"--method {args.method}: {e}") from e
    return candidates, config


def run(args) -> int:
    from dataclasses import replace

    from ..compress import quantize, size_report
    from ..saving import load, save

    plan_mode = args.target_bits is not None
    if not plan_mode:
        if args.method is None:
            raise LeanformerError("give --method (one of " + ", ".join(_methods()) + ") to quantize every layer "
                                  "alike, or --target-bits B to let a plan choose method and bits per layer")
        config = build_config(args)  # bad flags fail before the model loads
        wrong = _plan_flags(args, config.CALIBRATED)
        if wrong:
            raise LeanformerError(f"{', '.join(wrong)} only apply with --target-bits"
                                  + ("" if config.CALIBRATED else " (or a calibrated --method: gptq, kashin-gptq)"))
        if config.CALIBRATED:
            config = replace(config, calibration=_calibration(args),
                             **{k: getattr(args, k) for k in READING if hasattr(args, k)})
    else:
        candidates, plan_config = build_candidates(args)
    device = check_device(args.device)
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        # fail before the work, not after it (save would refuse the same way)
        raise OutputDirError(f"--out {out} already exists and is not empty; choose a new directory or pass "
                             "--overwrite to replace it")
    extra = None
    if plan_mode:
        from ..compress.plan import plan as make_plan

        calibration = _calibration(args)
        model, tokenizer = load(args.model, device=device)
        plan = make_plan(model, args.target_bits, calibration=calibration, tokenizer=tokenizer, candidates=candidates,
                         config=plan_config)
        print(plan)
        for report in quantize(model, plan):
            print(report)
        extra = {"plan.json": {"model": str(args.model), **plan.to_dict()}}
    else:
        model, tokenizer = load(args.model, device=device)
        if config.CALIBRATED:
            config = replace(config, tokenizer=tokenizer)
        print(quantize(model, config))
    print(size_report(model))
    save(model, tokenizer, args.out, overwrite=args.overwrite, extra_json=extra)
    print(f"wrote {args.out}" + (" with plan.json" if extra else "")
          + f" (load with lf.load or `leanformer eval {args.out} ...`)")
    return 0

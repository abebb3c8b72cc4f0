"""leanformer compress MODEL --method kashin|rtn|hqq [--bits B] [--group-size G] [--targets ...] --out DIR

The flags are the union of the methods' config fields (Kashin, RTN, HQQ); a flag left out keeps
the chosen method's own default."""
from __future__ import annotations

from pathlib import Path

from ..compress.quantization import METHODS
from ..errors import LeanformerError
from ..files import OutputDirError
from ._common import add_device, add_out, check_device
from ._config_args import add_config_arguments, cli_fields, config_from_args, flag_name, given

COMMAND = "compress"
HELP = "quantize a model's Linear layers (Kashin, RTN or HQQ) and save it with packed indices"

ORDER = ("kashin", "rtn", "hqq")  # flag order and help order; every registered method is offered


def _methods() -> dict[str, type]:
    return {m: METHODS[m] for m in sorted(METHODS, key=lambda m: (ORDER.index(m) if m in ORDER else len(ORDER), m))}


def add_arguments(p) -> None:
    methods = _methods()
    p.add_argument("model", metavar="MODEL", help="alias (minilm, stories260k), HF directory, or hub id")
    p.add_argument("--method", required=True, choices=list(methods), help="quantization method")
    add_config_arguments(p, *methods.values(), labels={cls: name for name, cls in methods.items()})
    add_out(p)
    add_device(p)


def build_config(args):
    """The chosen method's config from the flags; a flag of another method is an error, not ignored."""
    methods = _methods()
    cls = methods[args.method]
    own = set(given(args, cls))
    foreign = {}
    for name, other in methods.items():
        for field_name in given(args, other):
            if field_name not in own:
                foreign.setdefault(field_name, []).append(name)
    if foreign:
        wrong = "; ".join(f"--{f.replace('_', '-')} applies to {', '.join(ms)}" for f, ms in foreign.items())
        takes = ", ".join(flag_name(f) for f in cli_fields(cls))
        raise LeanformerError(f"{wrong}, not to --method {args.method}; {args.method} takes {takes}")
    return config_from_args(cls, args)


def run(args) -> int:
    from ..compress import quantize, size_report
    from ..saving import load, save

    config = build_config(args)  # bad flags fail before the model loads
    device = check_device(args.device)
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        # fail before the work, not after it (save would refuse the same way)
        raise OutputDirError(f"--out {out} already exists and is not empty; choose a new directory or pass "
                             "--overwrite to replace it")
    model, tokenizer = load(args.model, device=device)
    report = quantize(model, config)
    print(report)
    print(size_report(model))
    save(model, tokenizer, args.out, overwrite=args.overwrite)
    print(f"wrote {args.out} (load with lf.load or `leanformer eval {args.out} ...`)")
    return 0

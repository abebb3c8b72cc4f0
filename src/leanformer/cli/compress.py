"""leanformer compress MODEL --method kashin|rtn|hqq --bits B [--group-size G] [--targets ...] --out DIR"""
from __future__ import annotations

from pathlib import Path

from ._common import add_device, add_out, check_device

COMMAND = "compress"
HELP = "quantize a model's Linear layers (Kashin, RTN or HQQ) and save it with packed indices"

METHODS = ("kashin", "rtn", "hqq")


def add_arguments(p) -> None:
    p.add_argument("model", metavar="MODEL", help="alias (minilm, stories260k), HF directory, or hub id")
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--bits", type=int, required=True, help="index bits per weight (metadata is counted on top)")
    p.add_argument("--group-size", type=int, help="weights per group / Kashin vector; must divide each layer's "
                                                  "input width (default: rtn 128, hqq 64, kashin whole rows)")
    p.add_argument("--targets", nargs="+", metavar="NAME",
                   help="Linear module names or name suffixes (default: every Linear except embeddings and heads)")
    p.add_argument("--transform", default="dct", choices=["dct", "random"], help="Kashin: orthogonal transform")
    p.add_argument("--codebook", default="closed", choices=["closed", "kmeans"], help="Kashin: factor quantizer")
    p.add_argument("--step-sizes", default="vector", choices=["vector", "shared"],
                   help="Kashin closed form: step sizes per vector, or one set per layer + a scale per vector")
    p.add_argument("--seed", type=int, default=0)
    add_out(p)
    add_device(p)


def run(args) -> int:
    from ..saving import load
    from ..compress import quantize
    from ..saving import save
    from ..compress import size_report
    from ..files import OutputDirError

    device = check_device(args.device)
    kwargs = {"bits": args.bits, "targets": args.targets}
    if args.group_size is not None:
        kwargs["group_size"] = args.group_size
    if args.method == "kashin":
        from ..compress.kashin import Kashin

        config = Kashin(transform=args.transform, codebook=args.codebook, step_sizes=args.step_sizes,
                        seed=args.seed, **kwargs)
    elif args.method == "rtn":
        from ..compress.rtn import RTN

        config = RTN(**kwargs)
    else:
        from ..compress.hqq import HQQ

        config = HQQ(**kwargs)
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        # fail before the work, not after it (save would refuse the same way)
        raise OutputDirError(f"--out {out} already exists and is not empty; choose a new directory or pass "
                             "--overwrite to replace it")
    model, tokenizer = load(args.model, device=device)
    report = quantize(model, config)
    print(report)
    sizes = size_report(model)
    print(sizes)
    save(model, tokenizer, args.out, overwrite=args.overwrite)
    print(f"wrote {args.out} (load with lf.load or `leanformer eval {args.out} ...`)")
    return 0


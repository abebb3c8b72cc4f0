"""`leanformer export-peft DIR --out PEFT_DIR`: a leanformer adapter directory → a standard peft adapter."""
from __future__ import annotations

from ._common import add_out

COMMAND = "export-peft"
HELP = "export the adapter of a leanformer directory (e.g. from finetune) as a peft adapter directory"


def add_arguments(parser) -> None:
    parser.add_argument("model", metavar="DIR", help="leanformer directory holding an adapter (finetune's --out)")
    parser.add_argument("--adapter", metavar="NAME", help="adapter to export (default: the active one)")
    parser.add_argument("--rank", type=int, help="dylora: export at this rank (default: its current rank)")
    add_out(parser)


def run(args) -> int:
    from ..adapters import export_peft
    from ..saving import load

    model, _ = load(args.model)
    out = export_peft(model, args.out, name=args.adapter, rank=args.rank, overwrite=args.overwrite)
    print(f"wrote {out} (load with peft.PeftModel.from_pretrained(base_model, {str(out)!r}))")
    return 0

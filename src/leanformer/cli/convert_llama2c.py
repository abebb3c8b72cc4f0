"""`leanformer convert-llama2c CKPT --tokenizer TOK --out DIR`: llama2.c → Hugging Face Llama directory."""
from __future__ import annotations

from ._common import add_out

COMMAND = "convert-llama2c"
HELP = "convert a llama2.c checkpoint + tokenizer.bin into a Hugging Face Llama directory"


def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", metavar="CKPT", help="llama2.c legacy (version 0) .bin checkpoint")
    parser.add_argument("--tokenizer", required=True, metavar="TOK", help="llama2.c tokenizer .bin (e.g. tok512.bin)")
    add_out(parser)


def run(args) -> int:
    from ..convert import convert_llama2c
    from ..files import load_json

    out = convert_llama2c(args.checkpoint, args.tokenizer, args.out, overwrite=args.overwrite)
    cfg = load_json(out / "config.json")
    print(f"wrote {out}: LlamaForCausalLM, {cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, "
          f"vocab {cfg['vocab_size']} (load with transformers AutoModelForCausalLM / AutoTokenizer or lf.load)")
    return 0

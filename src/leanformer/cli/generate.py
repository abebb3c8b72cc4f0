"""`leanformer generate MODEL --prompt TEXT`: text continuation from a causal LM (greedy by default)."""
from __future__ import annotations

from ..generation import GenerateConfig
from ._common import add_device, check_device
from ._config_args import add_config_arguments, config_from_args

COMMAND = "generate"
HELP = "continue a prompt with a causal language model (greedy unless --temperature > 0)"


def add_arguments(parser) -> None:
    parser.add_argument("model", metavar="MODEL", help="alias (stories260k), model directory or hub id")
    parser.add_argument("--prompt", required=True, nargs="+", help="prompt text (several prompts allowed)")
    add_config_arguments(parser, GenerateConfig)
    add_device(parser)


def run(args) -> int:
    from ..generation import generate
    from ..saving import load

    config = config_from_args(GenerateConfig, args)  # bad values fail before the model loads
    model, tok = load(args.model, device=check_device(args.device))  # auto head: encoders fail clearly
    for prompt in args.prompt:
        print(generate(model, tok, prompt, config))
    return 0

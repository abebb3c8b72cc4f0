"""`leanformer generate MODEL --prompt TEXT`: text continuation from a causal LM (greedy by default)."""
from __future__ import annotations

from ._common import add_device, check_device

COMMAND = "generate"
HELP = "continue a prompt with a causal language model (greedy unless --temperature > 0)"


def add_arguments(parser) -> None:
    parser.add_argument("model", metavar="MODEL", help="alias (stories260k), model directory or hub id")
    parser.add_argument("--prompt", required=True, nargs="+", help="prompt text (several prompts allowed)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    parser.add_argument("--top-k", type=int, default=None, help="sample only from the k most likely tokens")
    parser.add_argument("--seed", type=int, default=0)
    add_device(parser)


def generate(model, tokenizer, prompt: str, max_new_tokens: int = 128, temperature: float = 0.0,
             top_k: int | None = None) -> str:
    import torch

    from ..errors import LeanformerError

    if not hasattr(model, "generate") or "CausalLM" not in type(model).__name__:
        raise LeanformerError(f"generate needs a causal LM; {type(model).__name__} is not one")
    if max_new_tokens < 1:
        raise LeanformerError(f"--max-new-tokens must be positive, got {max_new_tokens}")
    if temperature < 0:
        raise LeanformerError(f"--temperature must be ≥ 0 (0 = greedy), got {temperature}")
    device = next(model.parameters()).device
    enc = tokenizer(prompt, return_tensors="pt").to(device)
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit:
        max_new_tokens = max(1, min(max_new_tokens, limit - enc["input_ids"].shape[1]))
    kwargs = dict(do_sample=True, temperature=temperature, top_k=top_k or 0) if temperature > 0 else dict(do_sample=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **kwargs)
    return tokenizer.decode(out[0], skip_special_tokens=True)


def run(args) -> int:
    from ..saving import load
    from ..runtime import set_seed

    model, tok = load(args.model, device=check_device(args.device))  # auto head: encoders fail clearly
    for prompt in args.prompt:
        set_seed(args.seed)
        print(generate(model, tok, prompt, args.max_new_tokens, args.temperature, args.top_k))
    return 0

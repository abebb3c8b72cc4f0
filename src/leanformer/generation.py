"""generate(): continue a prompt with a causal language model, greedy by default or sampled with a
temperature and optional top-k cut-off (Fan et al. 2018), through the model's own `generate`."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .configs import check_positive, with_overrides
from .errors import LeanformerError
from .models import is_causal_lm


@dataclass
class GenerateConfig:
    max_new_tokens: int = field(default=128, metadata={
        "help": "tokens to add after the prompt (capped by the model's context length)"})
    temperature: float = field(default=0.0, metadata={"help": "0 = greedy; > 0 samples at this temperature"})
    top_k: int | None = field(default=None, metadata={
        "help": "sampling: draw only from the k most likely tokens (none = all)"})
    seed: int = field(default=0, metadata={"help": "sampling seed (every prompt starts from it)"})

    def __post_init__(self):
        check_positive(self, "max_new_tokens", "top_k")
        if self.temperature < 0:
            raise LeanformerError(f"temperature must be ≥ 0 (0 = greedy), got {self.temperature}")


def generate(model, tokenizer, prompt: str, config: GenerateConfig | None = None, **overrides) -> str:
    """The prompt and its continuation, decoded. `config` defaults to GenerateConfig() (greedy, 128
    new tokens); keywords override single fields: generate(model, tok, "Once", max_new_tokens=20).
    Sampling is seeded by config.seed without touching the caller's random state."""
    config = with_overrides(GenerateConfig, config, overrides)
    if not is_causal_lm(model) or not hasattr(model, "generate"):
        raise LeanformerError(f"generate needs a causal LM; {type(model).__name__} is not one")
    device = next(model.parameters()).device
    enc = tokenizer(prompt, return_tensors="pt").to(device)
    enc = {k: enc[k] for k in ("input_ids", "attention_mask") if k in enc}  # e.g. no BERT token_type_ids
    max_new_tokens = config.max_new_tokens
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit:
        max_new_tokens = max(1, min(max_new_tokens, limit - enc["input_ids"].shape[1]))
    sampling = config.temperature > 0
    kwargs = dict(do_sample=True, temperature=config.temperature, top_k=config.top_k or 0) if sampling \
        else dict(do_sample=False)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(config.seed)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=pad_id, **kwargs)
    return tokenizer.decode(out[0], skip_special_tokens=True)

"""Metric profiles of an encoder (minilm), a tiny random decoder and a trained small decoder
(stories260k, when the shared data is present, with its logit lens), each written as metrics.json +
report.html; provenance.json records the commit.

    python benchmarks/profiles_bench.py [--tokens 16384] [--out results/profiles]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from provenance import git_state


def tiny_random_decoder(directory: Path) -> Path:
    """A randomly initialised 4-block Llama (hidden 64) with minilm's tokenizer, saved as an HF dir."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from leanformer.models import alias_path

    tokenizer = AutoTokenizer.from_pretrained(alias_path("minilm"))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=172, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--out", default="results/profiles")
    args = p.parse_args()

    from leanformer.cli import main as cli
    from leanformer.files import save_json
    from leanformer.paths import data_root

    with tempfile.TemporaryDirectory() as tmp:
        models = {"minilm": "minilm", "tiny-random-llama": str(tiny_random_decoder(Path(tmp) / "tiny-random-llama"))}
        if data_root() is not None:
            models["stories260k"] = "stories260k"
        for name, model in models.items():
            text = []
            if name == "stories260k":  # its own domain; the default corpus is out of its 512-token vocabulary
                text = ["--text", str(data_root() / "text" / "tinystories.valid.txt")]
            print(f"== {name}")
            cli(["inspect", model, *text, "--tokens", str(args.tokens), "--out", f"{args.out}/{name}", "--overwrite"])
    save_json(Path(args.out) / "provenance.json", {**git_state(), "command": " ".join(sys.argv),
                                                   "models": list(models), "tokens": args.tokens})


if __name__ == "__main__":
    main()

"""Shared fixtures: tiny random models for mechanics, the real data directory when present.

`make_tiny_bert` / `make_tiny_llama` return factories; every call builds a fresh config and model
(pruning edits `model.config` in place, so no two models may share one), seeded by `seed`.
"""
from __future__ import annotations

import pytest
import torch
from transformers import (AutoTokenizer, BertConfig, BertForSequenceClassification, BertModel, LlamaConfig,
                          LlamaForCausalLM)

from leanformer.models import alias_path
from leanformer.paths import data_root

BERT_HEADS = {None: BertModel, "sequence-classification": BertForSequenceClassification}


def tiny_bert_model(layers: int = 2, seed: int = 0, head: str | None = None, vocab_size: int = 100,
                    **config) -> BertModel | BertForSequenceClassification:
    """A random BERT, hidden 32, 2 heads, FFN 64, in eval mode; `config` overrides BertConfig fields."""
    torch.manual_seed(seed)
    cfg = BertConfig(**{"hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64,
                        "max_position_embeddings": 128, "num_labels": 2, **config},
                     num_hidden_layers=layers, vocab_size=vocab_size)
    return BERT_HEADS[head](cfg).eval()


def tiny_llama_model(layers: int = 2, seed: int = 0, vocab_size: int = 100, **config) -> LlamaForCausalLM:
    """A random Llama causal LM, hidden 32, 4 query / 2 key-value heads, FFN 64, in eval mode;
    `config` overrides LlamaConfig fields."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(**{"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
                         "num_key_value_heads": 2, "max_position_embeddings": 128, **config},
                      num_hidden_layers=layers, vocab_size=vocab_size)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def make_tiny_bert():
    return tiny_bert_model


@pytest.fixture(scope="session")
def make_tiny_llama():
    return tiny_llama_model


@pytest.fixture(scope="session")
def tokenizer():
    return AutoTokenizer.from_pretrained(alias_path("minilm"))


@pytest.fixture
def tiny_bert(tokenizer):
    """A 3-block random BERT over minilm's vocabulary (so real text tokenizes into it)."""
    return tiny_bert_model(layers=3, vocab_size=tokenizer.vocab_size)


@pytest.fixture
def tiny_llama(tokenizer):
    """A 3-block random Llama over minilm's vocabulary."""
    return tiny_llama_model(layers=3, vocab_size=tokenizer.vocab_size)


@pytest.fixture
def tiny_bert_dir(tmp_path, tiny_bert, tokenizer):
    """tiny_bert and the minilm tokenizer saved as a Hugging Face directory (what the CLI loads)."""
    tiny_bert.save_pretrained(tmp_path / "tiny-bert")
    tokenizer.save_pretrained(tmp_path / "tiny-bert")
    return tmp_path / "tiny-bert"


@pytest.fixture
def tiny_llama_dir(tmp_path, tiny_llama, tokenizer):
    """tiny_llama and the minilm tokenizer saved as a Hugging Face directory."""
    tiny_llama.save_pretrained(tmp_path / "tiny-llama")
    tokenizer.save_pretrained(tmp_path / "tiny-llama")
    return tmp_path / "tiny-llama"


@pytest.fixture(scope="session")
def shared_data():
    root = data_root()
    if root is None:
        pytest.skip("shared data (../shared/data or $LEANFORMER_DATA) is not present")
    return root


@pytest.fixture
def one_intra_op_thread():
    """Quantization tests run many tiny matrix products, where intra-op threads cost more than they give: on a
    2-core machine shared with other work the minilm quantization test took 101 s with torch's 2 threads and
    34 s with one. A module opts in with `pytestmark = pytest.mark.usefixtures("one_intra_op_thread")`; the
    thread count is restored after each test, so no other test is affected."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ops():
    """The fused low-bit kernels (built on first use), or a skip where they cannot be built here."""
    from leanformer.compress import native

    module = native.ops()
    if module is None:
        pytest.skip("the fused kernels cannot be built on this machine (native.ops warned why)")
    return module

"""Shared fixtures: tiny random models for mechanics, the real data directory when present."""
from __future__ import annotations

import pytest
import torch

from leanformer.paths import data_root
from leanformer.models import alias_path


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(alias_path("minilm"))


@pytest.fixture(scope="session")
def tiny_bert(tokenizer):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    return BertModel(config).eval()


@pytest.fixture(scope="session")
def tiny_llama(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def shared_data():
    root = data_root()
    if root is None:
        pytest.skip("shared data (../shared/data or $LEANFORMER_DATA) is not present")
    return root

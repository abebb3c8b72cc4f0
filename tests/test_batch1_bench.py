"""benchmarks/batch1_bench.py on a tiny random Llama: model scaling, byte counts, one paired round, the table
(the full benchmark is run by hand or by make bench)."""
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import batch1_bench  # noqa: E402


@pytest.fixture
def tiny_base():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=172, num_attention_heads=8,
                                        num_key_value_heads=4, num_hidden_layers=1, vocab_size=128)).eval()


def test_llama_like_scales_the_widths_by_llamas_rule(tiny_base):
    model = batch1_bench.llama_like(tiny_base, 128, layers=2, seed=0)
    c = model.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.head_dim) == (128, 2, 2, 64)
    assert c.intermediate_size == 256 * math.ceil(8 * 128 / 3 / 256) == 512
    assert c.vocab_size == tiny_base.config.vocab_size


def test_one_paired_round_reports_every_config_against_fp32(tiny_base):
    model = batch1_bench.llama_like(tiny_base, 128, layers=1, seed=0)
    n_weights = sum(m.weight.numel() for n, m in model.named_modules() if n.endswith("proj"))
    row = batch1_bench.measure("tiny", model, prompt=list(range(1, 9)), rounds=2)
    assert row["linear_weights"] == n_weights
    assert set(row["configs"]) == {"fp32", batch1_bench.CONTROL, *batch1_bench.CONFIGS}
    fp32, control = row["configs"]["fp32"], row["configs"][batch1_bench.CONTROL]
    assert fp32["bytes_per_token"] == 4 * n_weights and fp32["decode_ms_speed_vs_fp32"]["median"] == 1.0
    assert control["bytes_per_token"] == fp32["bytes_per_token"] and control["decode_ms_speed_vs_fp32"]["rounds"] == 2
    for name in batch1_bench.CONFIGS:
        c = row["configs"][name]
        # 3-bit codes held as nibbles plus metadata: well under fp32's 32 bits, at least the codes' 4
        assert 4 * n_weights / 8 <= c["bytes_per_token"] < fp32["bytes_per_token"] / 4
        assert c["decode_ms"] > 0 and c["decode_ms_speed_vs_fp32"]["rounds"] == 2
    table = batch1_bench.markdown([row], "abc")
    assert table.count("| tiny |") == len(batch1_bench.CONFIGS) + 1  # and the A/A control

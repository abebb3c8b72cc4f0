"""Randomized backprop: exact forward and input / bias gradients, an unbiased weight gradient for
every sketch (Monte Carlo, against the exact gradient with a tolerance from the measured variance,
a check the mis-scaled DCT of the reference code fails), the memory it saves, bad input, and
lf.finetune leaving plain Linear layers behind."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from leanformer.errors import LeanformerError
from leanformer.train.randomized_backprop import (SKETCHES, RandomizedBackprop, RandomizedLinear, _SharedSketch,
                                                  apply_randomized_backprop, remove_randomized_backprop,
                                                  saved_for_backward, sketch_matrix)

N, D_IN, D_OUT, TRIALS = 20, 6, 4, 3000


def estimates(layer, x, g, trials):
    out = []
    for _ in range(trials):
        layer.weight.grad = None
        (layer(x) * g).sum().backward()
        out.append(layer.weight.grad.clone())
    return torch.stack(out)


def unbiased(samples: torch.Tensor, exact: torch.Tensor, z: float = 4.5) -> bool:
    """Every entry's Monte-Carlo mean within z standard errors of the exact value (z = 4.5 over 24
    entries: a false alarm about once in 10⁴ runs; the seeds below are fixed anyway)."""
    se = samples.std(0) / math.sqrt(samples.shape[0])
    return bool(((samples.mean(0) - exact).abs() <= z * se + 1e-6).all())


@pytest.mark.parametrize("kind", SKETCHES)
def test_weight_gradient_estimate_is_unbiased_and_the_rest_exact(kind):
    torch.manual_seed(0)
    base = nn.Linear(D_IN, D_OUT)
    x = torch.randn(2, N // 2, D_IN)  # batch × tokens × features: sketched along the N = 20 token rows
    g = torch.randn(2, N // 2, D_OUT)
    layer = RandomizedLinear(base, RandomizedBackprop(0.25, kind), _SharedSketch())
    xr = x.clone().requires_grad_(True)
    y = layer(xr)
    assert torch.equal(y, nn.functional.linear(x, base.weight, base.bias))  # exact forward
    (y * g).sum().backward()
    assert torch.allclose(xr.grad, g @ base.weight) and torch.allclose(base.bias.grad, g.sum((0, 1)))
    exact = g.reshape(-1, D_OUT).T @ x.reshape(-1, D_IN)
    samples = estimates(layer, x, g, TRIALS)
    assert unbiased(samples, exact)
    # a sketch of 5 of 20 rows is noisy: the test has power, the estimates are far from exact one by one
    assert (samples[0] - exact).abs().max() > 0.1 * exact.abs().max()


def test_the_reference_codes_dct_scaling_fails_the_same_check():
    """skolai/fewbit scales the subsampled DCT by k·N instead of N/k: off by k² (here 25), which the
    Monte-Carlo check must catch."""
    torch.manual_seed(1)
    base = nn.Linear(D_IN, D_OUT)
    x, g = torch.randn(N, D_IN), torch.randn(N, D_OUT)
    exact = g.T @ x
    samples = estimates(RandomizedLinear(base, RandomizedBackprop(0.25, "dct"), _SharedSketch()), x, g, 400)
    assert unbiased(samples, exact)
    assert not unbiased(samples * 5 ** 2, exact)


@pytest.mark.parametrize("kind", SKETCHES)
def test_sketch_is_regenerated_from_its_seed_and_isotropic(kind):
    s1 = sketch_matrix(kind, 7, 30, seed=123, device="cpu", dtype=torch.float32)
    assert torch.equal(s1, sketch_matrix(kind, 7, 30, seed=123, device="cpu", dtype=torch.float32))
    sketches = [sketch_matrix(kind, 7, 30, seed=s, device="cpu", dtype=torch.float64) for s in range(3000)]
    mean = sum(s.T @ s for s in sketches) / len(sketches)
    assert torch.allclose(mean, torch.eye(30, dtype=torch.float64), atol=0.12)  # E[SᵀS] = I


def test_saves_a_ratio_of_the_linear_inputs_and_shares_one_sketch_across_q_k_v():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)  # the encoder only: a pooler (a head, kept exact) would save a view of the last state
    model = BertModel(BertConfig(hidden_size=32, num_attention_heads=2, intermediate_size=64, num_hidden_layers=2,
                                 vocab_size=100), add_pooling_layer=False).train()
    batch = {"input_ids": torch.randint(0, 100, (4, 25))}
    torch.manual_seed(0)
    exact = saved_for_backward(model, batch)
    apply_randomized_backprop(model, RandomizedBackprop(0.2))
    torch.manual_seed(0)
    sketched = saved_for_backward(model, batch)
    # every body Linear now saves 20 of its 100 token rows; the attention-only activations are unchanged
    assert sketched["linear_inputs"] == pytest.approx(0.2 * exact["linear_inputs"], rel=0.02)
    assert exact["activations"] - exact["linear_inputs"] == sketched["activations"] - sketched["linear_inputs"]
    remove_randomized_backprop(model)
    assert not any(isinstance(m, RandomizedLinear) for m in model.modules())


def test_bad_input_gives_clear_errors(make_tiny_bert):
    for ratio in (0, -0.1, 1.5):
        with pytest.raises(LeanformerError, match=r"ratio must be in \(0, 1\]"):
            RandomizedBackprop(ratio)
    with pytest.raises(LeanformerError, match="unknown sketch 'fft'.*gaussian"):
        RandomizedBackprop(0.5, "fft")
    frozen = make_tiny_bert(layers=1)
    for p in frozen.parameters():
        p.requires_grad_(False)
    with pytest.raises(LeanformerError, match="no trainable nn.Linear"):
        apply_randomized_backprop(frozen, RandomizedBackprop(0.5))


def test_finetune_trains_with_it_and_leaves_plain_linears(tokenizer, tmp_path):
    from transformers import TrainingArguments

    from conftest import tiny_bert_model
    from leanformer.tasks import Split, Task
    from leanformer.train.finetuning import finetune

    texts = ["good fine", "bad sad", "great nice good", "awful poor"] * 8
    labels = [1, 0, 1, 0] * 8
    task = Task("toy", Split(texts, None, labels), Split(texts[:8], None, labels[:8]), ["0", "1"], ("accuracy",))
    model = tiny_bert_model(layers=2, head="sequence-classification", vocab_size=tokenizer.vocab_size)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=1e-3, max_steps=3, per_device_train_batch_size=8,
                             save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=True)
    m = finetune(model, tokenizer, task, args, method="full", max_seq_length=16,
                 randomized_backprop=RandomizedBackprop(0.5, "rademacher"))
    assert m["train_steps"] == 3 and math.isfinite(m["train_loss"])
    assert not any(isinstance(mod, RandomizedLinear) for mod in model.modules())
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert any("intermediate.dense.weight" in n for n in moved)  # the sketched gradients trained the weights

"""One target-selection rule for every transform: suffixes, a regex, all-linear, and filter_fn."""
from __future__ import annotations

import pytest

import leanformer as lf
from leanformer.errors import LeanformerError
from leanformer.targets import select_linear

BODY_PER_BLOCK = ("attention.self.query", "attention.self.key", "attention.self.value",
                  "attention.output.dense", "intermediate.dense", "output.dense")


def body(layers: int) -> list[str]:
    return [f"bert.encoder.layer.{i}.{s}" for i in range(layers) for s in BODY_PER_BLOCK]


def test_the_four_forms(make_tiny_bert):
    model = make_tiny_bert(layers=2, head="sequence-classification")
    assert select_linear(model, None) == select_linear(model, "all-linear") == body(2)  # no pooler, no classifier
    assert select_linear(model, ["query"]) == ["bert.encoder.layer.0.attention.self.query",
                                               "bert.encoder.layer.1.attention.self.query"]
    assert select_linear(model, r".*layer\.1\..*dense") == [n for n in body(2) if ".1." in n and "dense" in n]
    assert select_linear(model, "all-linear", lambda m, n: m.out_features == 64) == [
        "bert.encoder.layer.0.intermediate.dense", "bert.encoder.layer.1.intermediate.dense"]


def test_transformed_layers_keep_their_names(make_tiny_bert):
    model = make_tiny_bert(layers=2)
    before = select_linear(model, "all-linear")
    lf.adapt(model, lf.LoRA(rank=2, targets=["query"]))
    lf.quantize(model, lf.RTN(bits=4, group_size=16, targets=["query", "value"]), progress=False)
    assert select_linear(model, "all-linear") == before
    quantized = list(lf.applied(model)[-1].state["layers"])
    assert quantized == ["encoder.layer.0.attention.self.query.base_layer", "encoder.layer.0.attention.self.value",
                         "encoder.layer.1.attention.self.query.base_layer", "encoder.layer.1.attention.self.value"]
    with pytest.raises(LeanformerError, match="already quantized"):
        lf.quantize(model, lf.RTN(bits=4, group_size=16, targets=["value"]), progress=False)


def test_errors_name_the_layers(make_tiny_bert):
    model = make_tiny_bert(layers=1)
    with pytest.raises(LeanformerError, match="attention.self.query, attention.self.key"):
        select_linear(model, ["q_proj"])
    with pytest.raises(LeanformerError, match="with filter_fn"):
        select_linear(model, None, lambda m, n: False)
    with pytest.raises(LeanformerError, match="not Linear layers"):
        select_linear(model, ["attention"])
    with pytest.raises(LeanformerError, match="regex"):
        select_linear(model, "([")
    with pytest.raises(LeanformerError, match="empty"):
        select_linear(model, [])


def test_conv1d_is_a_linear_layer_with_its_weight_seen_as_out_in():
    import torch
    from transformers import GPT2Config, GPT2ForSequenceClassification
    from transformers.pytorch_utils import Conv1D

    from leanformer.targets import dense_weight, is_transposed, linear_shape

    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(GPT2Config(vocab_size=50, n_embd=16, n_head=2, n_layer=1, n_positions=16,
                                                     pad_token_id=0))
    # the body's four Conv1D projections; the score head and the (tied) embedding are not body
    assert select_linear(model, "all-linear") == [f"transformer.h.0.{s}" for s in
                                                  ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    c_fc = model.transformer.h[0].mlp.c_fc
    assert isinstance(c_fc, Conv1D) and is_transposed(c_fc) and linear_shape(c_fc) == (16, 64)
    x = torch.randn(3, 16)
    torch.testing.assert_close(c_fc(x), x @ dense_weight(c_fc).T + c_fc.bias)
    assert dense_weight(c_fc).data_ptr() == c_fc.weight.data_ptr()  # a view: merging writes through


def test_task_heads_of_any_architecture_are_not_body():
    from transformers import T5Config, T5ForSequenceClassification

    model = T5ForSequenceClassification(T5Config(vocab_size=50, d_model=16, d_kv=8, num_heads=2, d_ff=32,
                                                 num_layers=1))
    chosen = select_linear(model, "all-linear")
    assert chosen and not any("classification_head" in n for n in chosen)

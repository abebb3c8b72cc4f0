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

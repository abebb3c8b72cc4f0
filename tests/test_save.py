"""One save, one load: every pair and the triple of transforms round-trips exactly; bad directories fail clearly."""
from __future__ import annotations

import itertools
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import leanformer as lf
from leanformer.adapters.base import AdaptedLinear
from leanformer.compress.prune import LinearReplacement
from leanformer.errors import LeanformerError

IDS = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def tiny_llama(make_tiny_llama):
    return lambda seed=0: make_tiny_llama(layers=4, seed=seed, vocab_size=64)


def prune(model):
    # a fitted map, so the pruned model holds a module transformers does not know
    calib_states = [torch.randn(200, 32, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    from leanformer.compress.prune import Calibration

    lf.prune_layers(model, 1, by="index", start=1, replace="linear",
                    calibration=Calibration(calib_states, torch.arange(0, 200, 20)))


def quantize(model):
    lf.quantize(model, lf.RTN(bits=3, group_size=16), progress=False)


def adapt(model):
    lf.adapt(model, lf.LoRA(rank=2, targets="all-linear"))
    with torch.no_grad():  # a trained-looking adapter, so it changes the output
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(p.numel()))


TRANSFORMS = {"prune": prune, "quantize": quantize, "adapt": adapt}
STACKS = [list(p) for p in itertools.permutations(TRANSFORMS, 2)] + [["prune", "quantize", "adapt"]]


@pytest.mark.parametrize("stack", STACKS, ids=["→".join(s) for s in STACKS])
def test_every_pair_and_the_triple_reload_exactly(stack, tmp_path, tiny_llama):
    model = tiny_llama()
    for name in stack:
        TRANSFORMS[name](model)
    with torch.no_grad():
        expected = model(IDS).logits
    lf.save(model, None, tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "leanformer.json").read_text())
    assert [t["transform"] for t in meta["transforms"]] == stack
    loaded, _ = lf.load(tmp_path / "m")
    assert [e.transform for e in lf.applied(loaded)] == stack
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, expected, atol=1e-6, rtol=0)
    kinds = {type(m) for m in loaded.modules()}
    assert (LinearReplacement in kinds) == ("prune" in stack)
    assert (lf.QuantizedLinear in kinds) == ("quantize" in stack)
    assert (AdaptedLinear in kinds) == ("adapt" in stack)
    # a reloaded stack saves again, and that copy reloads the same
    lf.save(loaded, None, tmp_path / "again")
    with torch.no_grad():
        torch.testing.assert_close(lf.load(tmp_path / "again")[0](IDS).logits, expected, atol=1e-6, rtol=0)


def test_adapted_quantized_model_trains_only_the_adapter(tmp_path, tiny_llama):
    model = tiny_llama()
    quantize(model)
    adapt(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters." in n for n in trainable)
    loaded, _ = lf.load(lf.save(model, None, tmp_path / "m"))
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == trainable


def test_untransformed_and_block_dropped_models_are_plain_checkpoints(tmp_path, tiny_llama):
    model = tiny_llama()
    lf.save(model, None, tmp_path / "plain")
    lf.prune_layers(model, 1, by="index", start=2)
    lf.save(model, None, tmp_path / "dropped")
    for name, n_layers in (("plain", 4), ("dropped", 3)):
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / name).eval()
        assert hf.config.num_hidden_layers == n_layers
        ours, _ = lf.load(tmp_path / name)
        with torch.no_grad():
            torch.testing.assert_close(hf(IDS).logits, ours(IDS).logits, atol=0, rtol=0)


@pytest.fixture
def saved(tmp_path, tiny_llama):
    model = tiny_llama()
    quantize(model)
    adapt(model)
    return lf.save(model, None, tmp_path / "m")


def edit_meta(path, change):
    meta = json.loads((path / "leanformer.json").read_text())
    change(meta)
    (path / "leanformer.json").write_text(json.dumps(meta))


def test_unknown_transform_is_named(saved):
    edit_meta(saved, lambda m: m["transforms"].insert(1, {"transform": "distill", "config": {}, "state": {}}))
    with pytest.raises(LeanformerError, match=r"unknown transform\(s\) \['distill'\].*knows prune, quantize, adapt"):
        lf.load(saved)


def test_newer_format_asks_for_an_upgrade(saved):
    edit_meta(saved, lambda m: m.update(format=m["format"] + 1))
    with pytest.raises(LeanformerError, match="newer leanformer.*upgrade"):
        lf.load(saved)


def test_previous_format_is_named(saved):
    edit_meta(saved, lambda m: m.update(format=1, kind="quantized"))
    with pytest.raises(LeanformerError, match="format 1.*'quantized'.*re-create it with lf.save"):
        lf.load(saved)


def test_truncated_weights_file_is_reported(saved):
    f = saved / "leanformer.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(LeanformerError, match="truncated or corrupt"):
        lf.load(saved)


def test_tensors_that_do_not_fit_the_header_are_reported(saved):
    from safetensors.torch import load_file, save_file

    f = saved / "leanformer.safetensors"
    tensors = load_file(f)
    key = next(k for k in tensors if k.endswith(".packed"))
    tensors[key] = tensors[key][:-2]
    save_file(tensors, f)
    with pytest.raises(LeanformerError, match="do not fit"):
        lf.load(saved)


def test_header_promising_the_wrong_packed_size_is_corrupt(saved):
    def shrink(meta):
        layer = next(iter(meta["transforms"][0]["state"]["layers"].values()))
        layer["tensors"]["packed"][1] = [layer["tensors"]["packed"][1][0] - 1]
    edit_meta(saved, shrink)
    with pytest.raises(LeanformerError, match="packed bytes.*corrupt"):
        lf.load(saved)


def test_referenced_base_that_changed_names_both(tmp_path, tiny_llama):
    tiny_llama().save_pretrained(tmp_path / "base")
    model, _ = lf.load(tmp_path / "base")
    adapt(model)
    lf.save(model, None, tmp_path / "ad")
    assert json.loads((tmp_path / "ad" / "leanformer.json").read_text())["weights"]["base"] == "referenced"
    tiny_llama(seed=3).save_pretrained(tmp_path / "base")
    with pytest.raises(LeanformerError, match=f"different base.*{tmp_path / 'base'}.*fingerprint"):
        lf.load(tmp_path / "ad")


def test_failed_save_leaves_nothing_and_existing_dirs_are_kept(tmp_path, monkeypatch, tiny_llama):
    model = tiny_llama()
    quantize(model)
    lf.save(model, None, tmp_path / "m")
    before = sorted(p.name for p in (tmp_path / "m").iterdir())
    with pytest.raises(LeanformerError, match="already exists"):
        lf.save(model, None, tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == before

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("leanformer.saving.save_json", boom)
    with pytest.raises(OSError, match="disk full"):
        lf.save(model, None, tmp_path / "n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]

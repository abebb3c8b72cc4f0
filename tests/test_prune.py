"""Layer pruning / linear replacement: mechanics on tiny random models, save/load, errors, CLI."""
from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn

import leanformer as lf
from leanformer.capture import capture, find_blocks
from leanformer.compress.prune import (LinearReplacement, calibrate, fit_linear_map, prune_layers,
                                       pruned_copy, score_runs)
from leanformer.convert import build_tokenizer
from leanformer.paths import data_root
from leanformer.text import pad_batch
from leanformer.errors import LeanformerError

ROOT = data_root()
VOCAB = 300


@pytest.fixture(scope="module")
def tokenizer():
    # The llama2.c-style byte-fallback tokenizer over a toy vocabulary (3 specials + 256 bytes + pieces).
    pieces = [(b"<unk>", 0.0), (b"\n<s>\n", 0.0), (b"\n</s>\n", 0.0)] + [(f"<0x{i:02X}>".encode(), 0.0) for i in range(256)]
    chars = [bytes([c]) for c in b" etaoinshrdlucmfwypvbgkqjxz.,ETAOIS"]
    pieces += [(c, -float(i)) for i, c in enumerate(chars)][: VOCAB - len(pieces) - 6]
    pieces += [(p, -50.0 - i) for i, p in enumerate([b" t", b"he", b" the", b"in", b" a", b"an"])]
    assert len(pieces) == VOCAB
    return build_tokenizer(pieces)


@pytest.fixture
def toy_models(make_tiny_llama, make_tiny_bert):
    """Random models over the toy tokenizer's vocabulary: toy_models["llama"](layers=4, seed=0) (pre-norm),
    toy_models["bert"](layers=3, seed=0) (post-norm)."""
    return {"llama": functools.partial(make_tiny_llama, layers=4, vocab_size=VOCAB),
            "bert": functools.partial(make_tiny_bert, layers=3, vocab_size=VOCAB)}


# tiny_llama / tiny_bert: used only by test_heal_lowers_loss_and_stays_an_ordinary_checkpoint (rewritten
# separately); every other test takes `toy_models`. Delete both once that test does too.
def tiny_llama(layers=4, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(cfg).eval()


def tiny_bert(layers=3, seed=0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=64,
                     vocab_size=VOCAB)
    return BertModel(cfg).eval()


TEXTS = [f"the {w} sat on a mat and then the {v} ran in a hat." for w in ("cat", "dog", "owl", "fox", "hen")
         for v in ("ant", "bee", "eel", "yak", "elk", "emu")] * 2


def make_identity(model, i):
    """Zero the writes of block i into the residual stream: the block becomes exactly h ↦ h."""
    block = find_blocks(model)[0][i]
    for name in ("o_proj", "down_proj"):
        for m in block.modules():
            if hasattr(m, name):
                nn.init.zeros_(getattr(m, name).weight)
    return model


class IdentityBlock(nn.Module):
    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def batch(tokenizer, texts=TEXTS[:6]):
    return pad_batch(tokenizer, [tokenizer(t)["input_ids"] for t in texts])


def test_fit_linear_map_recovers_affine():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(500, 16, generator=g)
    A, b = torch.randn(16, 16, generator=g), torch.randn(16, generator=g)
    A_hat, b_hat = fit_linear_map(X, X @ A + b, ridge=1e-9)
    torch.testing.assert_close(A_hat, A, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(b_hat, b, atol=1e-4, rtol=1e-4)


def test_drop_equals_identity_block(tokenizer, toy_models):
    model = toy_models["llama"]()
    reference = make_identity(copy.deepcopy(model), 1)  # same weights, block 1 made a no-op
    prune_layers(model, 1, by="index", start=1)
    assert len(find_blocks(model)[0]) == 3 and model.config.num_hidden_layers == 3
    b = batch(tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(model(**b).logits, reference(**b).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_criteria_find_the_identity_block(tokenizer, toy_models, arch):
    model = toy_models[arch]()
    find_blocks(model)[0][1] = IdentityBlock()  # post-norm blocks cannot be zeroed into a no-op
    calib = calibrate(model, tokenizer, TEXTS, tokens=2000, max_length=32)
    scores = score_runs(calib, 1)
    assert scores["linearity"][1] == pytest.approx(1.0, abs=1e-6)
    assert scores["block_influence"][1] == pytest.approx(0.0, abs=1e-6)
    assert scores["angular"][1] == pytest.approx(0.0, abs=1e-3)
    for by in ("linearity", "block_influence", "angular"):
        assert prune_layers(copy.deepcopy(model), 1, by=by, calibration=calib).removed == [1]
    # runs of two blocks are scored from h_s to h_{s+2}
    assert len(score_runs(calib, 2)["linearity"]) == len(find_blocks(model)[0]) - 1


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_linear_replacement_beats_drop_at_the_cut(tokenizer, toy_models, arch):
    model = toy_models[arch]()
    calib = calibrate(model, tokenizer, TEXTS, tokens=2000, max_length=32)
    b = batch(tokenizer, TEXTS[-8:])
    target = capture(model, b)[0][3]  # h_3 = output of blocks 1..2 of the original
    errors = {}
    for replace in ("none", "linear"):
        m = pruned_copy(model, 2, 1, replace, calib)
        # dropping hands h_1 straight on; the map's output is the pruned model's h_2
        h = capture(m, b)[0][1 if replace == "none" else 2]
        if replace == "linear":
            assert isinstance(find_blocks(m)[0][1], LinearReplacement)
        errors[replace] = float((h - target).pow(2).mean())
    assert errors["linear"] < 0.5 * errors["none"], errors


def test_save_load_roundtrip_and_plain_transformers(tokenizer, toy_models, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    model = toy_models["llama"](layers=5)
    calib = calibrate(model, tokenizer, TEXTS, tokens=2000, max_length=32)
    dropped = pruned_copy(model, 2, 2, "none")
    prune_layers(model, 2, by="index", start=2, replace="linear", calibration=calib)
    lf.save(model, tokenizer, tmp_path / "p")
    assert not (tmp_path / "p" / "config.json").exists()  # a fitted map is not a transformers block
    loaded, tok = lf.load(tmp_path / "p")
    assert [type(b).__name__ for b in find_blocks(loaded)[0]] == ["LlamaDecoderLayer"] * 2 + ["LinearReplacement", "LlamaDecoderLayer"]
    assert lf.applied(loaded)[0].state["result"]["removed"] == [2, 3]
    lf.save(dropped, tokenizer, tmp_path / "d")  # dropped blocks only: an ordinary checkpoint
    assert AutoConfig.from_pretrained(tmp_path / "d").num_hidden_layers == 3
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "d").eval()
    b = batch(tok)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**b).logits, model(**b).logits)
        torch.testing.assert_close(plain(**b).logits, dropped(**b).logits, atol=1e-5, rtol=1e-5)
    # KV-cached generation through the map matches uncached greedy decoding.
    ids = tok("the cat", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        cached = loaded.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=2)
        seq = ids
        for _ in range(8):
            seq = torch.cat([seq, loaded(seq).logits[:, -1:].argmax(-1)], dim=1)
    assert cached.tolist() == seq.tolist()


def test_errors(tokenizer, toy_models):
    model = toy_models["llama"](layers=3)
    with pytest.raises(LeanformerError, match=r"cannot remove 3 of 3 blocks: choose 1\.\.2"):
        prune_layers(model, 3, by="index")
    with pytest.raises(LeanformerError, match="linearity, block_influence, angular, index"):
        prune_layers(model, 1, by="cosine")
    with pytest.raises(LeanformerError, match="none, linear"):
        prune_layers(model, 1, by="index", replace="mlp")
    with pytest.raises(LeanformerError, match=r"start in 0\.\.2"):
        prune_layers(model, 1, by="index", start=3)
    with pytest.raises(LeanformerError, match="needs at least 66"):
        prune_layers(model, 1, by="linearity", tokenizer=tokenizer, texts=["the cat"])
    with pytest.raises(LeanformerError, match="needs calibration text"):
        prune_layers(model, 1, by="linearity")

    class NoBlocks(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = model.config
            self.body = nn.Sequential(nn.Linear(4, 4))

    with pytest.raises(LeanformerError, match="looked for .*model.layers.*--blocks"):
        prune_layers(NoBlocks(), 1, by="index")


@pytest.mark.skipif(ROOT is None, reason="shared data (../shared/data or LEANFORMER_DATA) not found")
def test_cli_prune_stories260k(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from leanformer.cli import main

    monkeypatch.setenv("LEANFORMER_CACHE", str(tmp_path / "cache"))
    text = ROOT / "text/tinystories.valid.txt"
    assert main(["prune", "stories260k", "--layers", "1", "--by", "linearity", "--replace", "linear",
                 "--text", str(text), "--tokens", "2048", "--out", str(tmp_path / "p")]) == 0
    model, tok = lf.load(tmp_path / "p")
    assert model.config.num_hidden_layers == 5  # four blocks and the map
    assert sum(isinstance(b, LinearReplacement) for b in find_blocks(model)[0]) == 1
    from leanformer import generate

    assert generate(model, tok, "Once upon a time", max_new_tokens=20).startswith("Once upon a time")
    assert main(["prune", "stories260k", "--layers", "1", "--by", "index", "--out", str(tmp_path / "plain")]) == 0
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "plain").config.num_hidden_layers == 4
    assert main(["prune", "stories260k", "--layers", "5", "--out", str(tmp_path / "q")]) == 2


def test_output_hidden_states_include_the_map(tokenizer, toy_models):
    model = toy_models["bert"](layers=3)
    calib = calibrate(model, tokenizer, TEXTS, tokens=2000, max_length=32)
    prune_layers(model, 1, by="index", start=2, replace="linear", calibration=calib)  # the last block
    b = batch(tokenizer)
    with torch.no_grad():
        out = model(**b, output_hidden_states=True)
    assert len(out.hidden_states) == 4  # h_0, blocks 0 and 1, the map
    torch.testing.assert_close(out.hidden_states[-1], out.last_hidden_state)


def test_heal_lowers_loss_and_stays_an_ordinary_checkpoint(tokenizer, tmp_path):
    model = tiny_llama(layers=3)
    calib = calibrate(model, tokenizer, TEXTS, tokens=2000, max_length=32)
    prune_layers(model, 1, by="index", start=1, replace="linear", calibration=calib)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    info = lf.heal(model, tokenizer, TEXTS, steps=15, rank=4, learning_rate=1e-2, batch_size=4, max_length=32,
                   progress=False)
    assert info["heal_steps"] == 15 and info["heal_loss_last"] < 0.95 * info["heal_loss_first"]
    assert not any("lora" in n or "adapters" in n for n, _ in model.named_parameters())  # merged and stripped
    assert not any(p.requires_grad for p in model.parameters())
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert any("q_proj" in n for n in changed) and any(".layers.1." in n for n in changed)  # LoRA merged; the map trained
    assert [e.transform for e in lf.applied(model)] == ["prune", "heal"]
    assert lf.applied(model)[1].config["rank"] == 4
    lf.save(model, tokenizer, tmp_path / "h")
    loaded, _ = lf.load(tmp_path / "h")  # the heal entry replays as a record only
    assert [e.transform for e in lf.applied(loaded)] == ["prune", "heal"]
    b = batch(tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**b).logits, model(**b).logits)
    with pytest.raises(LeanformerError, match="teacher"):
        lf.heal(tiny_bert(), tokenizer, TEXTS, steps=1)
    # An encoder distils the unpruned model's last hidden state.
    teacher = tiny_bert(layers=3)
    encoder = copy.deepcopy(teacher)
    prune_layers(encoder, 1, by="index", start=1)
    info = lf.heal(encoder, tokenizer, TEXTS, steps=12, rank=4, learning_rate=1e-2, batch_size=4, max_length=32,
                   teacher=teacher, progress=False)
    assert info["heal_loss_last"] < info["heal_loss_first"]
    assert lf.applied(encoder)[-1].config["loss"] == "teacher last hidden state (MSE)"

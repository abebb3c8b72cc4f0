"""Cosine regulariser values, gradients, and pretraining with it on transformers.Trainer."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from leanformer.capture import find_blocks
from leanformer.errors import LeanformerError
import leanformer.train.pretrain as pretrain_module
from leanformer.train.pretrain import PretrainConfig, linearity_profile, make_model, pretrain, split_stream
from leanformer.capture import residual_stream
from leanformer.train.regularizers import CosineRegularizer


def test_values_by_hand():
    h0 = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])  # (batch 1, 2 tokens, d 2)
    h1 = torch.tensor([[[0.0, 2.0], [1.0, 1.0]]])
    h2 = h1.clone()
    reg = CosineRegularizer(0.5)
    # token 0: 1 − cos = 1; token 1: 0 → mean 0.5 for transition 1, 0 for transition 2
    torch.testing.assert_close(reg.per_layer([h0, h1, h2]), torch.tensor([0.5, 0.0]))
    torch.testing.assert_close(reg([h0, h1, h2]), torch.tensor(0.25))
    # padding is excluded: only token 0 counts
    torch.testing.assert_close(reg.per_layer([h0, h1, h2], torch.tensor([[1, 0]])), torch.tensor([1.0, 0.0]))
    with pytest.raises(LeanformerError, match="≥ 0"):
        CosineRegularizer(-1)
    with pytest.raises(LeanformerError, match="residual_stream"):
        reg([h0, None])


def tiny_cfg(**kw):
    base = dict(dim=32, n_layers=2, n_heads=2, hidden_dim=64, vocab_size=64, seq_len=32, batch_size=4, steps=20,
                learning_rate=3e-3, warmup_steps=4, eval_every=10, eval_tokens=256, profile_tokens=256)
    base.update(kw)
    return PretrainConfig(**base)


def stream(n=6000, seed=0):
    # A learnable stream: a repeating pattern with noise, so next-token loss can fall well below log(V).
    g = torch.Generator().manual_seed(seed)
    pattern = torch.randint(3, 64, (37,), generator=g)
    ids = pattern.repeat(n // 37 + 1)[:n].clone()
    noise = torch.rand(n, generator=g) < 0.1
    ids[noise] = torch.randint(3, 64, (int(noise.sum()),), generator=g)
    return ids


def test_residual_stream_and_gradient():
    model = make_model(tiny_cfg())
    x = torch.randint(0, 64, (2, 16))
    with residual_stream(model) as states:
        model(input_ids=x)
        loss = CosineRegularizer(1.0)(states)
    assert len(states) == 3 and all(s.shape == (2, 16, 32) for s in states)
    loss.backward()
    block = find_blocks(model)[0][0]
    assert block.mlp.down_proj.weight.grad.abs().sum() > 0
    assert find_blocks(model)[0][0]._forward_hooks == {}  # hooks removed on exit


def test_identity_blocks_cost_nothing():
    model = make_model(tiny_cfg())

    class Identity(nn.Module):
        def forward(self, hidden_states, *a, **k):
            return hidden_states

    blocks = find_blocks(model)[0]
    blocks[0], blocks[1] = Identity(), Identity()
    with residual_stream(model) as states:
        model(input_ids=torch.randint(0, 64, (2, 8)))
        assert float(CosineRegularizer(0.5)(states)) == pytest.approx(0.0, abs=1e-6)


def test_pretrain_learns_is_deterministic_and_regulariser_acts():
    train, val = split_stream(stream(), 0.2)
    _, a = pretrain(tiny_cfg(), train, val, progress=False)
    _, b = pretrain(tiny_cfg(), train, val, progress=False)
    assert a["val_nll"] == b["val_nll"] and a["profile"] == b["profile"]
    assert a["val_nll"] < math.log(64) - 0.5  # clearly below a uniform guess after 20 steps
    assert [h["step"] for h in a["history"]] == [10, 20]
    _, r = pretrain(tiny_cfg(lam=5.0), train, val, progress=False)
    assert r["history"][-1]["train_reg"] > 0
    # the term pulls adjacent residual states together: mean cosine rises
    assert sum(r["profile"]["cosine"]) > sum(a["profile"]["cosine"])
    assert set(a["profile"]) == {"linearity", "linearity_wo_residual", "cosine"} and len(a["profile"]["linearity"]) == 2
    assert a["train_seconds_per_step"] > 0 and a["total_params"] == sum(p.numel() for p in make_model(tiny_cfg()).parameters())


def test_runs_that_differ_only_in_lambda_see_the_same_batches(monkeypatch):
    seen: dict[float, list[torch.Tensor]] = {}

    def recording(cfg):
        model = make_model(cfg)
        batches = seen.setdefault(cfg.lam, [])
        model.model.embed_tokens.register_forward_pre_hook(
            lambda module, args: batches.append(args[0].clone()) if module.training else None)
        return model

    monkeypatch.setattr(pretrain_module, "make_model", recording)
    train, val = split_stream(stream(), 0.2)
    for lam in (0.0, 2.0):
        pretrain(tiny_cfg(steps=6, eval_every=3, lam=lam), train, val, progress=False)
    assert len(seen[0.0]) == 6 and all(b.shape == (4, 32) for b in seen[0.0])  # steps × (batch, seq_len)
    assert all(torch.equal(x, y) for x, y in zip(seen[0.0], seen[2.0]))
    assert not torch.equal(seen[0.0][0], seen[0.0][1])


def test_short_streams_fail_clearly():
    with pytest.raises(LeanformerError, match="training stream"):
        pretrain(tiny_cfg(), torch.arange(10), torch.arange(100), progress=False)
    with pytest.raises(LeanformerError, match="validation stream"):
        linearity_profile(make_model(tiny_cfg()), torch.arange(10), 32, 256)

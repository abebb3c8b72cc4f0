"""NAG-GS: the γ update, the paper's rate and critical step on a quadratic, bad input, a checkpoint
round trip; and the finetune command's memory flags (--optimizer naggs, --method sparsegrad / meprop,
--randomized-backprop, --linearity-reg) end to end on a tiny model."""
from __future__ import annotations

import csv
import json
import random

import pytest
import torch
from torch import nn

import leanformer as lf
from leanformer.cli import main
from leanformer.errors import LeanformerError
from leanformer.optim import NAGGS, critical_step, spectral_radius_on_quadratic


def quadratic_run(alpha, curvatures, steps, mu=1.0, gamma=1.0, **kw):
    x = nn.Parameter(torch.ones(len(curvatures), dtype=torch.float64))
    lam = torch.tensor(curvatures, dtype=torch.float64)
    opt = NAGGS([x], lr=alpha, mu=mu, gamma=gamma, **kw)
    norms = []
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * (lam * x * x).sum()).backward()
        opt.step()
        norms.append(float(x.detach().norm()))
    return norms, opt


def test_gamma_follows_its_update_and_nag4_keeps_it():
    alpha, mu, gamma0, steps = 0.1, 1.0, 2.0, 5
    _, opt = quadratic_run(alpha, [1.0, 3.0], steps, mu=mu, gamma=gamma0)
    a = alpha / (1 + alpha)
    # one update per step plus the first explicit half-step: γ → μ geometrically
    assert opt.param_groups[0]["gamma"] == pytest.approx(mu + (gamma0 - mu) * (1 - a) ** (steps + 1), rel=1e-12)
    assert opt.param_groups[0]["gamma"] != pytest.approx(gamma0)  # the reference code's stored value
    _, nag4 = quadratic_run(alpha, [1.0, 3.0], steps, mu=mu, gamma=gamma0, fixed_gamma=True)
    assert nag4.param_groups[0]["gamma"] == gamma0


def test_one_step_matches_the_papers_update_by_hand():
    alpha, mu, gamma = 0.3, 0.7, 1.9
    x0 = torch.tensor([1.0, -2.0], dtype=torch.float64)
    x = nn.Parameter(x0.clone())
    opt = NAGGS([x], lr=alpha, mu=mu, gamma=gamma)
    g = torch.tensor([0.5, 0.25], dtype=torch.float64)
    x.grad = g.clone()
    opt.step()
    a = alpha / (1 + alpha)
    gamma1 = (1 - a) * gamma + a * mu          # first explicit half-step (x stays: v₀ = x₀)
    b = alpha * mu / (alpha * mu + gamma1)
    v1 = (1 - b) * x0 + b * (x0 - g / mu)
    x1 = (1 - a) * x0 + a * v1
    assert torch.allclose(x.detach(), x1) and torch.allclose(opt.state[x]["v"], v1)
    assert opt.param_groups[0]["gamma"] == pytest.approx((1 - a) * gamma1 + a * mu)


@pytest.mark.parametrize("fraction", [0.2, 0.6, 0.95])
def test_rate_on_a_quadratic_is_the_spectral_radius_the_analysis_predicts(fraction):
    curvatures, mu = [1.0, 4.0, 15.0, 50.0], 1.0
    alpha = fraction * critical_step(mu, max(curvatures))
    norms, _ = quadratic_run(alpha, curvatures, 600, mu=mu, gamma=mu)
    predicted = max(spectral_radius_on_quadratic(alpha, mu, c) for c in curvatures)
    measured = (norms[-1] / norms[-301]) ** (1 / 300)
    assert predicted < 1 and measured == pytest.approx(predicted, rel=0.01)


def test_stable_up_to_the_critical_step_and_not_beyond():
    curvatures, mu = [1.0, 50.0], 1.0
    alpha_max = critical_step(mu, 50.0)
    assert alpha_max == pytest.approx(2 / (7 - 1))
    below, _ = quadratic_run(0.97 * alpha_max, curvatures, 400)
    above, _ = quadratic_run(1.03 * alpha_max, curvatures, 400)
    assert below[-1] < 1e-3 and above[-1] > 1e3
    assert critical_step(1.0, 1.5) == float("inf")  # L ≤ 2μ: any step is stable
    calm, _ = quadratic_run(50.0, [1.5], 200)
    assert calm[-1] < 1e-6


@pytest.mark.parametrize("kw", [dict(lr=0.0), dict(lr=-1e-2), dict(mu=0.0), dict(gamma=-1.0)])
def test_non_positive_hyperparameters_are_refused(kw):
    with pytest.raises(LeanformerError, match=f"{next(iter(kw)) if 'lr' not in kw else 'lr'}.*must be a positive"):
        NAGGS([nn.Parameter(torch.zeros(2))], **kw)


def test_state_dict_round_trip_carries_gamma():
    _, opt = quadratic_run(0.1, [2.0], 3, gamma=3.0)
    p = nn.Parameter(torch.zeros(1, dtype=torch.float64))
    fresh = NAGGS([p], lr=0.1, gamma=3.0)
    fresh.load_state_dict(opt.state_dict())
    assert fresh.param_groups[0]["gamma"] == opt.param_groups[0]["gamma"] != 3.0


# ------------------------------------------------------------------------------------------------
# The finetune command with the memory options


POS, NEG = ["good", "great", "fine", "nice"], ["bad", "awful", "poor", "sad"]


def _rows(n, seed):
    r = random.Random(seed)
    out = []
    for _ in range(n):
        y = r.randint(0, 1)
        out.append({"sentence": " ".join(r.choice(POS if y else NEG) for _ in range(r.randint(2, 6))), "label": str(y)})
    return out


@pytest.fixture(scope="module")
def cli_setup(tmp_path_factory, tokenizer):
    from conftest import tiny_bert_model

    d = tmp_path_factory.mktemp("mem")
    tiny_bert_model(layers=2, vocab_size=tokenizer.vocab_size).save_pretrained(d / "tiny")
    tokenizer.save_pretrained(d / "tiny")
    for name, rows in (("train", _rows(64, 0)), ("dev", _rows(16, 1))):
        with open(d / f"{name}.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["sentence", "label"])
            w.writeheader()
            w.writerows(rows)
    return d, f"{d / 'train.csv'},{d / 'dev.csv'}"


FLAGS = ["--num-train-epochs", "1", "--per-device-train-batch-size", "16", "--max-seq-length", "16",
         "--disable-tqdm", "true", "--save-strategy", "no"]


@pytest.mark.parametrize("flags", [
    ["--method", "full", "--optimizer", "naggs", "--linearity-reg", "0.1", "--randomized-backprop", "0.5",
     "--sketch", "dct"],
    ["--method", "sparsegrad", "--rank", "2", "--learning-rate", "1e-2"],
    ["--method", "meprop", "--topk", "100", "--learning-rate", "1e-2"],
])
def test_finetune_memory_flags(cli_setup, tmp_path, flags):
    d, task = cli_setup
    out = tmp_path / "run"
    assert main(["finetune", str(d / "tiny"), "--task", task, *flags, *FLAGS, "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["train_steps"] == 4 and m["optimizer_state_bytes"] > 0
    if "naggs" in flags:
        assert m["optimizer"] == "naggs" and 0 < m["linearity_reg"] < 1
        model, _ = lf.load(out)
        assert all(type(mod) is nn.Linear for mod in model.modules() if isinstance(mod, nn.Linear))
    else:
        assert m["optimizer"] == "adamw"
        # sparse state: far below AdamW's two dense moments of the trained MLP updates
        dense_moments = 2 * 4 * 2 * 2 * (32 * 64)
        assert m["optimizer_state_bytes"] < dense_moments
        assert main(["eval", str(out), "--task", task, "--max-seq-length", "16"]) == 0


def test_finetune_memory_flags_refuse_bad_values(cli_setup, tmp_path, capsys):
    d, task = cli_setup
    for flags, message in ((["--method", "full", "--randomized-backprop", "1.5"], "ratio must be in (0, 1]"),
                           (["--method", "lora", "--randomized-backprop", "0.5"], "no trainable nn.Linear"),
                           (["--method", "sparsegrad", "--optimizer", "naggs"], "sparse optimizer state"),
                           (["--method", "lora", "--topk", "3"], "--topk applies to")):
        assert main(["finetune", str(d / "tiny"), "--task", task, *flags, *FLAGS, "--out", str(tmp_path / "x")]) == 2
        assert message in capsys.readouterr().err

"""Each metric against an independent computation of its published definition: linearity (Razzhigaev et al.,
"Your Transformer is Secretly Linear", ACL 2024), anisotropy (Razzhigaev et al., "The Shape of Learning", EACL
2024 Findings), TwoNN intrinsic dimension (Facco et al., Sci. Rep. 2017), block influence (Men et al., ShortGPT,
2024) and angular distance (Gromov et al., "The Unreasonable Ineffectiveness of the Deeper Layers", 2024)."""
import numpy as np
import pytest
import torch

from leanformer.metrics import (GeometryAccumulator, angular_distance, anisotropy, block_influence,
                                intrinsic_dimension, linearity, linearity_wo_residual, sample_positions)


def reference_linearity(X, Y):
    """1 − ‖X̃A − Ỹ‖² with A from numpy's float64 least squares (an independent solver)."""
    X = np.asarray(X, dtype=np.float64); Y = np.asarray(Y, dtype=np.float64)
    X = X - X.mean(0); Y = Y - Y.mean(0)
    X /= np.linalg.norm(X); Y /= np.linalg.norm(Y)
    A = np.linalg.lstsq(X, Y, rcond=None)[0]
    return 1 - np.linalg.norm(X @ A - Y) ** 2


@pytest.fixture
def pair():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(3000, 24, generator=g) * torch.linspace(0.1, 3, 24) + 5
    Y = torch.tanh(X @ torch.randn(24, 24, generator=g) / 8) + 0.3 * torch.randn(3000, 24, generator=g)
    return X, Y


def test_linearity_matches_float64_least_squares(pair):
    X, Y = pair
    assert linearity(X, Y) == pytest.approx(reference_linearity(X, Y), abs=1e-9)
    assert linearity_wo_residual(X, Y) == pytest.approx(reference_linearity(X, Y - X), abs=1e-9)
    assert 0.05 < linearity(X, Y) < 0.95  # a non-trivial case


def test_linearity_of_exact_linear_map_is_one_and_of_noise_is_near_zero():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(20000, 8, generator=g)
    assert linearity(X, X @ torch.randn(8, 8, generator=g)) == pytest.approx(1.0, abs=1e-9)
    assert linearity(X, torch.randn(20000, 8, generator=g)) < 2e-3  # expected ≈ d/n = 4e-4


def test_linearity_guarded_on_rank_deficient_input():
    g = torch.Generator().manual_seed(2)
    X = torch.randn(2000, 4, generator=g) @ torch.randn(4, 16, generator=g)  # rank 4 in 16-D
    Y = X @ torch.randn(16, 16, generator=g)
    value = linearity(X, Y)
    assert np.isfinite(value) and value == pytest.approx(1.0, abs=1e-6)


def test_streaming_equals_full_matrix_path(pair):
    X, Y = pair
    Z = Y + 0.5 * torch.sin(Y)
    acc = GeometryAccumulator(sample_positions(len(X), 500))
    for start in range(0, len(X), 700):  # uneven batches
        rows = slice(start, start + 700)
        acc.update([X[rows], Y[rows], Z[rows]], np.arange(len(X))[rows], torch.tensor([0]))
    t = acc.transition_metrics()
    # Batch products are float32 (summed in float64): agreement to ~1e-6, far inside the 1e-3 we promise.
    for i, (a, b) in enumerate([(X, Y), (Y, Z)]):
        assert t[i]["linearity"] == pytest.approx(linearity(a, b), abs=1e-5)
        assert t[i]["linearity_wo_residual"] == pytest.approx(linearity_wo_residual(a, b), abs=1e-5)
        assert t[i]["block_influence"] == pytest.approx(block_influence(a, b), abs=1e-7)
    layers = acc.layer_metrics()
    for i, m in enumerate([X, Y, Z]):
        assert layers[i]["anisotropy"] == pytest.approx(anisotropy(m), abs=1e-5)


def test_anisotropy_rank_one_and_isotropic():
    g = torch.Generator().manual_seed(3)
    assert anisotropy(torch.randn(500, 1, generator=g) @ torch.randn(1, 32, generator=g)) == pytest.approx(1.0, abs=1e-9)
    assert anisotropy(torch.randn(50000, 32, generator=g)) == pytest.approx(1 / 32, rel=0.15)
    # Against the SVD definition σ₁²/Σσ² on a generic matrix.
    E = torch.randn(400, 12, generator=g) * torch.arange(1, 13)
    E = E.double()
    s = torch.linalg.svdvals(E - E.mean(0))
    assert anisotropy(E) == pytest.approx(float(s[0] ** 2 / (s ** 2).sum()), abs=1e-10)


def test_twonn_recovers_subspace_dimension():
    g = torch.Generator().manual_seed(4)
    basis = torch.linalg.qr(torch.randn(64, 5, generator=g)).Q  # 5-D linear subspace of 64-D
    X = torch.randn(4000, 5, generator=g) @ basis.T
    assert intrinsic_dimension(X) == pytest.approx(5, rel=0.10)


def test_twonn_recovers_swiss_roll_dimension():
    rng = np.random.default_rng(5)
    t = 1.5 * np.pi * (1 + 2 * rng.random(4000))
    X = np.stack([t * np.cos(t), 21 * rng.random(4000), t * np.sin(t)], axis=1)  # a 2-D manifold in 3-D
    assert intrinsic_dimension(torch.tensor(X)) == pytest.approx(2, rel=0.10)


def test_twonn_agrees_with_scikit_dimension():
    skdim = pytest.importorskip("skdim")
    rng = np.random.default_rng(6)
    X = rng.standard_normal((2000, 7)) @ rng.standard_normal((7, 40))
    ours = intrinsic_dimension(torch.tensor(X), keep=0.9)
    theirs = skdim.id.TwoNN(discard_fraction=0.1).fit(X).dimension_
    assert ours == pytest.approx(theirs, rel=1e-6)


def test_twonn_ignores_exact_duplicates():
    g = torch.Generator().manual_seed(7)
    X = torch.randn(1500, 4, generator=g) @ torch.randn(4, 32, generator=g)
    with_dupes = torch.cat([X, X[:300], X[:300]])
    assert intrinsic_dimension(with_dupes) == pytest.approx(intrinsic_dimension(X), rel=0.1)


def test_block_influence_and_angular_distance_definitions():
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    y = torch.tensor([[0.0, 1.0], [0.0, 5.0]])  # cosines 0 and 1
    assert block_influence(x, y) == pytest.approx(0.5)
    assert angular_distance(x, y) == pytest.approx((0.5 + 0.0) / 2)


def test_sample_positions_are_seeded_unique_and_order_free(pair):
    p = sample_positions(1000, 100, seed=3)
    assert len(set(p.tolist())) == 100 and list(p) == sorted(p) and p.max() < 1000
    assert np.array_equal(p, sample_positions(1000, 100, seed=3))
    assert len(sample_positions(50, 100)) == 50  # fewer tokens than the sample size: all of them
    # Feeding the same rows in another batch order keeps the same points, so every metric agrees.
    X, Y = pair
    sample = sample_positions(len(X), 400)
    forward, shuffled = GeometryAccumulator(sample), GeometryAccumulator(sample)
    for start in range(0, len(X), 500):
        forward.update([X[start:start + 500], Y[start:start + 500]], np.arange(start, min(start + 500, len(X))),
                       torch.tensor([0]))
    for start in reversed(range(0, len(X), 300)):
        shuffled.update([X[start:start + 300], Y[start:start + 300]], np.arange(start, min(start + 300, len(X))),
                        torch.tensor([0]))
    assert forward.layer_metrics()[1]["intrinsic_dim"] == pytest.approx(shuffled.layer_metrics()[1]["intrinsic_dim"], abs=1e-12)
    assert forward.layer_metrics()[1]["intrinsic_dim"] == pytest.approx(intrinsic_dimension(Y[sample]), abs=1e-12)
    assert forward.transition_metrics()[0]["linearity"] == pytest.approx(shuffled.transition_metrics()[0]["linearity"], abs=1e-6)


def exact_two_nn_ratios(X: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """μ from float64 differences to every point (no Gram form, no candidates)."""
    X = X.double()
    X = X - X.mean(0)
    X = X / X.norm(dim=1).mean()
    D = torch.cdist(X, X, compute_mode="donot_use_mm_for_euclid_dist")
    D.fill_diagonal_(float("inf"))
    r = D.topk(2, dim=1, largest=False).values
    valid = r[:, 0] > eps
    mu = r[valid, 1] / r[valid, 0]
    return mu[mu > 1 + eps]


def test_two_nn_ratios_are_exact_even_among_near_ties():
    from leanformer.metrics.twonn import two_nn_ratios

    g = torch.Generator().manual_seed(8)
    cloud = torch.randn(1500, 6, generator=g) @ torch.randn(6, 96, generator=g)
    # a point with 40 neighbours at almost the same distance: its float32 candidates cannot be trusted
    shell = torch.nn.functional.normalize(torch.randn(40, 96, generator=g), dim=1) * (1 + 1e-6 * torch.rand(40, 1, generator=g))
    X = torch.cat([cloud, 50 + torch.zeros(1, 96), 50 + shell, cloud[:100]])  # and exact duplicates
    ours, exact = two_nn_ratios(X).sort().values, exact_two_nn_ratios(X).sort().values
    assert ours.shape == exact.shape and torch.allclose(ours, exact, rtol=1e-12, atol=0)


def test_paper_estimator_fits_the_smallest_fifth():
    from leanformer.metrics.twonn import ID_ESTIMATORS, two_nn_ratios

    g = torch.Generator().manual_seed(9)
    X = torch.randn(2000, 8, generator=g) @ torch.randn(8, 50, generator=g)
    mu = two_nn_ratios(X).sort().values
    n = len(mu)
    x = mu[: n // 5].log()
    y = -torch.log1p(-torch.arange(1, n // 5 + 1, dtype=torch.float64) / n)
    assert intrinsic_dimension(X, keep=ID_ESTIMATORS["twonn-paper"]) == pytest.approx(float((x * y).sum() / (x * x).sum()), rel=1e-12)
    assert ID_ESTIMATORS["twonn-skdim"] == 0.9  # test_twonn_agrees_with_scikit_dimension checks this fit

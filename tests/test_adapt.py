"""Adapters: mechanics on a tiny random BERT, exactness of merge / save / peft export, clear errors."""
from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from peft import PeftModel

import leanformer as lf
from leanformer.adapters import AdaptedLinear
from leanformer.adapters.krona import kron_apply
from leanformer.adapters.lora_xs import truncated_svd
from leanformer.errors import LeanformerError

CONFIGS = {
    "lora": lambda: lf.LoRA(rank=4, modules_to_save=["classifier"]),
    "lora_xs": lambda: lf.LoRAXS(rank=4, targets="all-linear"),
    "dylora": lambda: lf.DyLoRA(rank=4),
    "krona": lambda: lf.KronA(targets=["query", "value", "intermediate.dense"]),
}


@pytest.fixture
def tiny_classifier(make_tiny_bert):
    """tiny_classifier(seed=0): a fresh 2-block random BERT sequence classifier (vocabulary 100, hidden 32)."""
    return functools.partial(make_tiny_bert, layers=2, head="sequence-classification")


@pytest.fixture
def ids():
    return torch.randint(0, 100, (3, 9), generator=torch.Generator().manual_seed(1))


def randomize_trainable(model, seed=2):
    """Adapters start as ΔW = 0; give them values so that equalities below are not trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize("method", list(CONFIGS))
def test_starts_as_identity_and_freezes_base(method, ids, tiny_classifier):
    model = tiny_classifier()
    ref = model(ids).logits
    lf.adapt(model, CONFIGS[method]())
    torch.testing.assert_close(model(ids).logits, ref, atol=1e-4, rtol=0)  # ΔW ≈ 0 at init (LoRA-XS: R ~ 1e-5)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".adapters." in n or n.startswith("classifier") for n in trainable)
    assert any(".adapters." in n for n in trainable)


def test_parameter_counts_match_the_papers(tiny_classifier):
    """Trainable counts in closed form from the layer shapes in the config, per paper:
    LoRA (Hu et al. 2021, §4.1): B ∈ ℝ^{d_out×r}, A ∈ ℝ^{r×d_in}, r·(d_in + d_out) per layer;
    DyLoRA (Valipour et al. 2023): the same two factors at r_max;
    LoRA-XS (Bałazy et al. 2024): only the r×r core R trains, r² per layer;
    KronA (Edalati et al. 2022): A ∈ ℝ^{a1×a2}, B ∈ ℝ^{b1×b2}, a1·b1 = d_out, a2·b2 = d_in, a1·a2 + b1·b2 per layer.
    Frozen base weights and LoRA-XS's frozen SVD factors (buffers) are not trainable parameters; a module
    to save (the classifier) trains in place, adding to the trainable count but not to the total."""
    base = tiny_classifier()
    cfg = base.config
    blocks, d, d_ff, labels = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_labels
    assert (d, d_ff) == (32, 64)  # the KronA shapes below are written for a 64×32 FFN input projection
    n_base = sum(p.numel() for p in base.parameters())
    r, qv = 4, ["query", "value"]  # query and value are d×d, two per block
    classifier = labels * d + labels
    cases = {  # config: (adapter parameters, base parameters that train)
        "lora": (lf.LoRA(rank=r, targets=qv), 2 * blocks * r * (d + d), 0),
        "lora + trained classifier": (lf.LoRA(rank=r, targets=qv, modules_to_save=["classifier"]),
                                      2 * blocks * r * (d + d), classifier),
        "dylora": (lf.DyLoRA(rank=r, targets=qv), 2 * blocks * r * (d + d), 0),
        "lora_xs": (lf.LoRAXS(rank=r, targets=qv), 2 * blocks * r * r, 0),
        # near-square factors by default: 64 = 8·8 and 32 = 4·8, so A is 8×4 and B is 8×8
        "krona": (lf.KronA(targets=["intermediate.dense"]), blocks * (8 * 4 + 8 * 8), 0),
        "krona, A 2×8": (lf.KronA(targets=["intermediate.dense"], a_shape=(2, 8)),
                         blocks * (2 * 8 + (d_ff // 2) * (d // 8)), 0),
    }
    for case, (config, added, unfrozen) in cases.items():
        model = tiny_classifier()
        lf.adapt(model, config)
        counts = lf.trainable_parameters(model)
        assert counts["trainable"] == added + unfrozen, case
        assert counts["total"] == n_base + added, case
        assert counts["percent"] == pytest.approx(100 * (added + unfrozen) / (n_base + added)), case
    model = tiny_classifier()
    lf.adapt(model, cases["krona"][0])
    a = model.bert.encoder.layer[0].intermediate.dense.adapters["default"]
    assert tuple(a.kron_A.shape) == (8, 4) and tuple(a.kron_B.shape) == (8, 8)


@pytest.mark.parametrize("method", list(CONFIGS))
def test_merge_unmerge_exact(method, ids, tiny_classifier):
    model = tiny_classifier()
    base_w = {n: p.detach().clone() for n, p in model.named_parameters()}
    lf.adapt(model, CONFIGS[method]())
    randomize_trainable(model)
    y = model(ids).logits
    lf.merge(model)
    adapted = [m for m in model.modules() if isinstance(m, AdaptedLinear)]
    assert adapted and all(m.merged for m in adapted)
    torch.testing.assert_close(model(ids).logits, y, atol=1e-5, rtol=1e-5)
    lf.unmerge(model)
    assert not any(m.merged for m in adapted)
    torch.testing.assert_close(model(ids).logits, y, atol=1e-5, rtol=1e-5)
    # every original weight is back (the classifier trains, so it is not compared)
    after = {n.replace(".base_layer.", "."): p for n, p in model.named_parameters() if ".adapters." not in n}
    for name, weight in base_w.items():
        if not name.startswith("classifier"):
            torch.testing.assert_close(after[name], weight, atol=1e-6, rtol=0)


def test_krona_never_materialises_but_equals_kron():
    g = torch.Generator().manual_seed(0)
    a, b, x = torch.randn(3, 5, generator=g), torch.randn(4, 2, generator=g), torch.randn(7, 6, 10, generator=g)
    torch.testing.assert_close(kron_apply(a, b, x), x @ torch.kron(a, b).T, atol=1e-5, rtol=1e-5)


def test_krona_given_shapes_and_errors(tiny_classifier):
    m = tiny_classifier()
    lf.adapt(m, lf.KronA(targets=["query"], a_shape=(2, 8)))
    a = m.bert.encoder.layer[0].attention.self.query.adapters["default"]
    assert tuple(a.kron_B.shape) == (16, 4)
    with pytest.raises(LeanformerError, match="do not multiply out|a1·b1"):
        lf.adapt(tiny_classifier(), lf.KronA(targets=["query"], a_shape=(2, 8), b_shape=(4, 4)))
    with pytest.raises(LeanformerError, match="does not divide"):
        lf.adapt(tiny_classifier(), lf.KronA(targets=["query"], a_shape=(5, 8)))


def test_krona_block_variants(ids, tiny_classifier):
    model = tiny_classifier()
    ref = model(ids).logits
    lf.adapt(model, lf.KronA(targets=r".*layer\.\d+\.output\.dense", variant="block_res"))
    layer = model.bert.encoder.layer[0].output.dense
    assert tuple(layer.adapters["default"].kron_A.shape)[1] * tuple(layer.adapters["default"].kron_B.shape)[1] == 32
    torch.testing.assert_close(model(ids).logits, ref)  # A = 0 and s_res = 0 at init
    randomize_trainable(model)
    assert not torch.allclose(model(ids).logits, ref)
    # The block adapter reads the FFN input: check one layer by hand.
    captured = {}
    enc = model.bert.encoder.layer[0]
    h = enc.intermediate.register_forward_pre_hook(lambda m, a: captured.setdefault("x", a[0]))
    h2 = enc.output.dense.register_forward_hook(lambda m, a, o: captured.setdefault("y", o))
    model(ids)
    h.remove()
    h2.remove()
    ad = enc.output.dense.adapters["default"]
    x = captured["x"]
    expect = enc.output.dense.base_layer(enc.intermediate(x)) + x @ torch.kron(ad.kron_A, ad.kron_B).T * ad.scaling \
        + ad.res_scale * x
    torch.testing.assert_close(captured["y"], expect, atol=1e-5, rtol=1e-5)
    with pytest.raises(LeanformerError, match="cannot be merged"):
        lf.merge(model)


def test_dylora_rank_sampling_and_set_rank(ids, tiny_classifier):
    model = tiny_classifier()
    lf.adapt(model, lf.DyLoRA(rank=4))
    randomize_trainable(model)
    q = model.bert.encoder.layer[0].attention.self.query.adapters["default"]
    model.train()
    torch.manual_seed(0)
    seen = set()
    for _ in range(30):
        model(ids)
        seen.add(q.train_rank)
        assert all(m.adapters["default"].train_rank == q.train_rank for m in model.modules()
                   if isinstance(m, AdaptedLinear))  # one rank per step for all layers
    assert seen == {1, 2, 3, 4}
    model.eval()
    outs = {}
    for r in (1, 2, 4):
        lf.set_rank(model, r)
        outs[r] = model(ids).logits
        expected = (q.lora_B[:, :r] @ q.lora_A[:r]) * (16.0 / r)
        torch.testing.assert_close(q.delta_weight(), expected)
    assert not torch.allclose(outs[1], outs[4])
    with pytest.raises(LeanformerError, match="1..4"):
        lf.set_rank(model, 5)


def test_dylora_frozen_mode_trains_only_component_b(ids, tiny_classifier):
    model = tiny_classifier()
    lf.adapt(model, lf.DyLoRA(rank=4, frozen=True))
    randomize_trainable(model)
    model.train()
    q = model.bert.encoder.layer[0].attention.self.query.adapters["default"]
    for m in model.modules():
        if isinstance(m, AdaptedLinear):
            m.adapters["default"].train_rank = 3
    q.train_rank = 3
    q.lora_A.grad = None
    # Call the layer directly (the model's pre-hook would resample the rank).
    x = torch.randn(5, 32)
    q(x).sum().backward()
    grad = q.lora_A.grad
    assert grad[:2].abs().sum() == 0 and grad[2].abs().sum() > 0 and grad[3].abs().sum() == 0


def test_named_adapters_switch(ids, tiny_classifier):
    model = tiny_classifier()
    ref = model(ids).logits
    lf.adapt(model, lf.LoRA(rank=2), name="a")
    randomize_trainable(model, 3)
    ya = model(ids).logits
    lf.adapt(model, lf.LoRA(rank=4, targets=["key"]), name="b")
    randomize_trainable(model, 4)
    yb = model(ids).logits
    assert not torch.allclose(ya, yb)
    lf.set_adapter(model, "a")
    torch.testing.assert_close(model(ids).logits, ya)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.a." in n for n in trainable)
    lf.set_adapter(model, None)
    torch.testing.assert_close(model(ids).logits, ref)
    with pytest.raises(LeanformerError, match="no adapter named 'c'"):
        lf.set_adapter(model, "c")
    with pytest.raises(LeanformerError, match="already exists"):
        lf.adapt(model, lf.LoRA(), name="a")


def named_tiny(tiny_classifier, tmp_path, seed=0):
    """A tiny_classifier base that lives in a directory, as a loaded checkpoint does."""
    tiny_classifier(seed=seed).save_pretrained(tmp_path / "base")
    model = tiny_classifier(seed=seed)
    model.name_or_path = str(tmp_path / "base")
    return model


@pytest.mark.parametrize("method", list(CONFIGS) + ["krona_block"])
def test_save_load_roundtrip(method, ids, tmp_path, tiny_classifier):
    model = named_tiny(tiny_classifier, tmp_path)
    cfg = CONFIGS[method]() if method != "krona_block" else lf.KronA(targets=r".*layer\.\d+\.output\.dense",
                                                                      variant="block")
    lf.adapt(model, cfg)
    randomize_trainable(model)
    if method == "dylora":
        lf.set_rank(model, 3)
    y = model(ids).logits
    lf.save(model, None, tmp_path / "ad")  # the base has a directory: referenced, not copied
    assert sorted(p.name for p in (tmp_path / "ad").iterdir()) == ["leanformer.json", "leanformer.safetensors"]
    for loaded in (lf.load(tmp_path / "ad")[0], lf.load(tmp_path / "ad", base=tiny_classifier())[0]):
        torch.testing.assert_close(loaded(ids).logits, y, atol=0, rtol=0)
    lf.save(model, None, tmp_path / "full", base_weights="stored")
    torch.testing.assert_close(lf.load(tmp_path / "full")[0](ids).logits, y, atol=0, rtol=0)
    # A base with other weights is refused with a clear message naming both.
    with pytest.raises(LeanformerError, match="different base.*fingerprint"):
        lf.load(tmp_path / "ad", base=tiny_classifier(seed=7))
    tiny_classifier(seed=7).save_pretrained(tmp_path / "base")  # the recorded base directory changed since
    with pytest.raises(LeanformerError, match=f"different base.*{tmp_path / 'base'}"):
        lf.load(tmp_path / "ad")


def test_merged_adapters_save_with_the_base(ids, tmp_path, tiny_classifier):
    model = named_tiny(tiny_classifier, tmp_path)
    lf.adapt(model, lf.LoRA(rank=2))
    randomize_trainable(model)
    y = model(ids).logits
    lf.merge(model)
    lf.unmerge(model)
    lf.save(model, None, tmp_path / "ad")  # the fingerprint survives a merge/unmerge round trip
    torch.testing.assert_close(lf.load(tmp_path / "ad", base=tiny_classifier())[0](ids).logits, y, atol=1e-6, rtol=0)
    lf.merge(model)
    with pytest.raises(LeanformerError, match="merged"):
        lf.save(model, None, tmp_path / "ref", base_weights="referenced")
    lf.save(model, None, tmp_path / "merged")  # merged: the base changed, so it is stored whole
    loaded, _ = lf.load(tmp_path / "merged")
    layers = [layer for _, layer in lf.adapters.base.adapted_layers(loaded)]
    assert layers and all(layer.merged == "default" for layer in layers)
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0, rtol=0)


@pytest.mark.parametrize("method", ["lora", "lora_xs", "dylora", "krona"])
def test_export_to_peft_loads_and_matches(method, ids, tmp_path, tiny_classifier):
    model = tiny_classifier()
    lf.adapt(model, CONFIGS[method]())
    randomize_trainable(model)
    kwargs = {}
    if method == "dylora":
        lf.set_rank(model, 2)
        y = model(ids).logits
        lf.set_rank(model, 4)
        kwargs = {"rank": 2}
    else:
        y = model(ids).logits
    lf.export_peft(model, tmp_path / "peft", **kwargs)
    loaded = PeftModel.from_pretrained(tiny_classifier(), str(tmp_path / "peft")).eval()
    torch.testing.assert_close(loaded(input_ids=ids).logits, y, atol=1e-5, rtol=1e-5)


def test_export_krona_errors_when_lokr_cannot_express_shapes(tmp_path, tiny_classifier):
    model = tiny_classifier()
    lf.adapt(model, lf.KronA(targets=["query"], a_shape=(2, 8)))  # out split 2×16, in split 8×4: no one factor
    with pytest.raises(LeanformerError, match="peft LoKr"):
        lf.export_peft(model, tmp_path / "x")
    model = tiny_classifier()
    lf.adapt(model, lf.KronA(targets=r".*layer\.\d+\.output\.dense", variant="block"))
    with pytest.raises(LeanformerError, match="no equivalent"):
        lf.export_peft(model, tmp_path / "y")


def test_targets_errors_name_the_linear_modules(tiny_classifier):
    with pytest.raises(LeanformerError) as e:
        lf.adapt(tiny_classifier(), lf.LoRA(targets=["q_proj", "v_proj"]))
    msg = str(e.value)
    assert "attention.self.query" in msg and "intermediate.dense" in msg
    with pytest.raises(LeanformerError, match="not Linear layers"):
        lf.adapt(tiny_classifier(), lf.LoRA(targets=["attention"]))
    with pytest.raises(LeanformerError, match="regex"):
        lf.adapt(tiny_classifier(), lf.LoRA(targets="(["))


def test_regex_and_all_linear_targets(tiny_classifier):
    m = tiny_classifier()
    lf.adapt(m, lf.LoRA(rank=2, targets=r".*layer\.0\.attention\.self\.(query|key)"))
    assert sorted(n for n, x in m.named_modules() if isinstance(x, AdaptedLinear)) == [
        "bert.encoder.layer.0.attention.self.key", "bert.encoder.layer.0.attention.self.query"]
    m = tiny_classifier()
    lf.adapt(m, lf.LoRA(rank=2, targets="all-linear"))
    wrapped = [n for n, x in m.named_modules() if isinstance(x, AdaptedLinear)]
    # the body's 6 Linear layers per block; the pooler and the classifier belong to the head
    assert len(wrapped) == 2 * 6 and not any("classifier" in n or "pooler" in n for n in wrapped)


@pytest.mark.parametrize("rank", [0, -1, 33])
def test_bad_ranks(rank, tiny_classifier):
    for cls in (lf.LoRA, lf.LoRAXS, lf.DyLoRA):
        with pytest.raises(LeanformerError, match="rank"):
            lf.adapt(tiny_classifier(), cls(rank=rank))


def top_subspace_projectors(w: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U_r U_rᵀ, V_r V_rᵀ and the best rank-r approximation U_r Σ_r V_rᵀ of w (Eckart–Young), from a float64
    full SVD: all three are unchanged by the signs or a rotation of the singular vectors."""
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    u, s, v = u[:, :r], s[:r], vh[:r].T
    return u @ u.T, v @ v.T, u @ torch.diag(s) @ v.T


def test_lora_xs_factors_come_from_the_svd(tiny_classifier):
    """LoRA-XS (Bałazy et al. 2024): B = U_r and A = Σ_r V_rᵀ from the truncated SVD of W, so ΔW = (α/r)·B R A
    lives in W's top-r singular subspaces whatever the trainable core R."""
    model = tiny_classifier()
    w = model.bert.encoder.layer[0].attention.self.query.weight.detach().clone()
    r = 4
    lf.adapt(model, lf.LoRAXS(rank=r, targets=["query"]))
    a = model.bert.encoder.layer[0].attention.self.query.adapters["default"]
    B, A = a.xs_B.double(), a.xs_A.double()
    assert B.shape == (32, r) and A.shape == (r, 32)
    left, right, w_r = top_subspace_projectors(w, r)
    torch.testing.assert_close(B @ A, w_r, atol=1e-5, rtol=0)                       # B A = U_r Σ_r V_rᵀ
    torch.testing.assert_close(B.T @ B, torch.eye(r, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(B @ B.T, left, atol=1e-5, rtol=0)                     # span B = span U_r
    torch.testing.assert_close(A.T @ torch.linalg.solve(A @ A.T, A), right, atol=1e-5, rtol=0)  # rows of A span V_r
    s = torch.linalg.svdvals(w.double())[:r]
    torch.testing.assert_close(torch.linalg.svdvals(A), s, atol=1e-5, rtol=0)       # A = Σ_r V_rᵀ: its σ are W's top r
    with torch.no_grad():
        a.xs_R.copy_(torch.randn(r, r, generator=torch.Generator().manual_seed(0)))
    delta = a.delta_weight().double()
    assert delta.norm() > 0.1 * w.norm()
    torch.testing.assert_close(left @ delta @ right, delta, atol=1e-5, rtol=0)       # ΔW = U_r (·) V_rᵀ
    assert torch.linalg.matrix_rank(delta, atol=1e-6) == r


def test_randomized_svd_close_to_exact():
    """Halko et al. (2011) randomized range finder vs the exact SVD: the same top-8 singular values, the
    same singular subspaces and the same rank-8 approximation."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 40, generator=g) @ torch.randn(40, 200, generator=g)  # rank 40
    u, s, v = truncated_svd(w, 8, randomized=True)
    u2, s2, v2 = truncated_svd(w, 8, randomized=False)
    left, right, w_8 = top_subspace_projectors(w, 8)
    torch.testing.assert_close(s2.double(), torch.linalg.svdvals(w.double())[:8], rtol=1e-5, atol=0)
    torch.testing.assert_close(s, s2, rtol=1e-3, atol=0)
    for uu, vv in ((u, v), (u2, v2)):
        uu, vv = uu.double(), vv.double()
        assert uu.shape == (300, 8) and vv.shape == (200, 8)
        torch.testing.assert_close(uu @ uu.T, left, atol=1e-3, rtol=0)
        torch.testing.assert_close(vv @ vv.T, right, atol=1e-3, rtol=0)
    approx = (u * s) @ v.T
    assert (approx.double() - w_8).norm() < 1e-2 * w_8.norm()


def test_lora_xs_file_holds_only_the_cores_and_checks_the_rebuilt_factors(ids, tmp_path, tiny_classifier):
    """A saved LoRA-XS adapter stores the r×r cores and a checksum of the SVD factors, not the factors:
    they are rebuilt from the base at load (canonical signs) and must match the checksum."""
    from safetensors import safe_open

    model = named_tiny(tiny_classifier, tmp_path)
    r = 4
    lf.adapt(model, lf.LoRAXS(rank=r, targets=["query", "value"], modules_to_save=["classifier"]))
    randomize_trainable(model)
    y = model(ids).logits
    lf.save(model, None, tmp_path / "xs")
    with safe_open(str(tmp_path / "xs" / "leanformer.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    adapter = {k: s for k, s in shapes.items() if ".adapters." in k}
    assert sorted({k.rsplit(".", 1)[1] for k in adapter}) == ["xs_R", "xs_check"]
    assert all(s == (r, r) for k, s in adapter.items() if k.endswith("xs_R")) and len(adapter) == 2 * 2 * 2
    torch.testing.assert_close(lf.load(tmp_path / "xs")[0](ids).logits, y, atol=0, rtol=0)
    other = tiny_classifier()
    with torch.no_grad():  # an adapted layer's weight is outside the base fingerprint: only the checksum sees it
        w = other.bert.encoder.layer[1].attention.self.value.weight
        w.copy_(w + 0.05 * torch.randn(w.shape, generator=torch.Generator().manual_seed(3)))
    with pytest.raises(LeanformerError, match=r"layer\.1\.attention\.self\.value.*do not match the checksum"):
        lf.load(tmp_path / "xs", base=other)


def test_canonical_svd_signs_do_not_depend_on_the_input_sign():
    """svd_flip convention: each column of U has its largest-magnitude entry positive, so W and a
    re-run give the same factors, and −W gives the same U with V negated."""
    w = torch.randn(24, 16, generator=torch.Generator().manual_seed(0))
    u, s, v = truncated_svd(w, 5)
    assert (u.gather(0, u.abs().argmax(0, keepdim=True)) > 0).all()
    u2, s2, v2 = truncated_svd(-w, 5)
    torch.testing.assert_close(u2, u)
    torch.testing.assert_close(v2, -v)


def test_peft_export_records_a_base_path_peft_can_resolve(tmp_path):
    """An alias ("minilm") is not a path peft can fetch: the export records the alias's local directory."""
    import json

    model, _ = lf.load("minilm", head="sequence-classification", num_labels=2)
    lf.adapt(model, lf.LoRA(rank=2))
    lf.export_peft(model, tmp_path / "peft")
    recorded = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded != "minilm" and (Path(recorded) / "config.json").is_file()

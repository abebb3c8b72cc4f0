"""SparseGrad and MeProp: the gradient basis, the exact reparametrised forward, the top-k backward,
the sparse-state optimizer, revert to plain Linear layers, save/load, finetune, and bad input."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import leanformer as lf
from leanformer.adapters.base import strip_adapters
from leanformer.adapters.sparsegrad import SparseGradModule, keep_top_k, touched_entries
from leanformer.errors import LeanformerError
from leanformer.optim import SparseStateAdamW, mark_sparse, state_bytes


def batches(n, seed=0, size=4, length=10, vocab=100):
    g = torch.Generator().manual_seed(seed)
    return [dict(input_ids=torch.randint(0, vocab, (size, length), generator=g),
                 labels=torch.randint(0, 2, (size,), generator=g)) for _ in range(n)]


def mlp_names(model):
    return [n for n, _ in model.named_modules() if n.endswith("intermediate.dense") or
            (n.endswith("output.dense") and "attention" not in n)]


@pytest.fixture
def bert(make_tiny_bert):
    return make_tiny_bert(layers=2, head="sequence-classification")


def test_basis_is_the_hosvd_of_the_stacked_gradients(bert):
    cfg = lf.SparseGrad(budget_rank=2, basis_steps=3)
    data = batches(5)
    cfg.fit_basis(bert, data)
    assert set(cfg.bases) == {"intermediate.dense", "output.dense"}
    assert not any(p.grad is not None for p in bert.parameters())  # nothing left behind
    # the same factors from the stacked tensor's unfoldings (HOSVD), computed the long way
    names = [n for n in mlp_names(bert) if n.endswith("intermediate.dense")]
    grads = []
    for b in data[:3]:
        w = [bert.get_submodule(n).weight for n in names]
        for p in w:
            p.requires_grad_(True)
        grads += torch.autograd.grad(bert(**b).loss, w)
    stacked = torch.stack(grads).double()                          # (t, out, in)
    out_unfold = stacked.permute(1, 0, 2).reshape(stacked.shape[1], -1)
    in_unfold = stacked.permute(2, 0, 1).reshape(stacked.shape[2], -1)
    u_out = torch.linalg.svd(out_unfold, full_matrices=False)[0]
    u_in = torch.linalg.svd(in_unfold, full_matrices=False)[0]
    U, V = (t.double() for t in cfg.bases["intermediate.dense"])
    assert torch.allclose(U @ U.T, torch.eye(U.shape[0], dtype=U.dtype), atol=1e-5)
    # the leading singular directions agree up to sign (the eigenvector order is ascending)
    assert abs(float(V[:, -1] @ u_out[:, 0])) == pytest.approx(1.0, abs=1e-4)
    assert abs(float(U[-1] @ u_in[:, 0])) == pytest.approx(1.0, abs=1e-4)


def test_forward_is_exact_and_backward_keeps_the_top_k_of_the_rotated_gradient(bert):
    ids = batches(1)[0]
    dense_model = __import__("copy").deepcopy(bert)
    cfg = lf.SparseGrad(topk=37)
    cfg.fit_basis(bert, batches(4, seed=1))
    before = bert(input_ids=ids["input_ids"]).logits
    lf.adapt(bert, cfg)
    assert torch.equal(bert(input_ids=ids["input_ids"]).logits, before)
    # the dense gradient of W in the original model, rotated: Vᵀ G Uᵀ; its top-37 is what SparseGrad returns
    dense_model.train(), bert.train()
    name = mlp_names(bert)[0]
    w = dense_model.get_submodule(name).weight
    torch.manual_seed(0)
    (g_dense,) = torch.autograd.grad(dense_model(**ids).loss, [w])
    torch.manual_seed(0)
    bert(**ids).loss.backward()
    module = bert.get_submodule(name).adapters["default"]
    U, V = module.basis_in, module.basis_out
    expected = keep_top_k(V.T @ g_dense @ U.T, 37)
    assert int(torch.count_nonzero(module.delta.grad)) == 37
    assert torch.allclose(module.delta.grad, expected, atol=1e-6 * float(g_dense.abs().max()))


def test_meprop_keeps_the_top_k_of_the_plain_gradient(bert):
    ids = batches(1)[0]
    plain = __import__("copy").deepcopy(bert).train()
    lf.adapt(bert, lf.MeProp(topk=11))
    bert.train()
    name = mlp_names(bert)[1]
    torch.manual_seed(0)
    (g,) = torch.autograd.grad(plain(**ids).loss, [plain.get_submodule(name).weight])
    torch.manual_seed(0)
    bert(**ids).loss.backward()
    delta = bert.get_submodule(name).adapters["default"].delta
    assert torch.allclose(delta.grad, keep_top_k(g, 11), atol=1e-7)


def test_sparse_state_adamw_equals_adamw_on_dense_gradients_and_stores_only_touched_entries():
    torch.manual_seed(0)
    a = mark_sparse(nn.Parameter(torch.randn(6, 5)))
    b = nn.Parameter(a.detach().clone())
    ours = SparseStateAdamW([a], lr=1e-2, weight_decay=0.1)
    ref = torch.optim.AdamW([b], lr=1e-2, weight_decay=0.1)
    for _ in range(5):
        g = torch.randn(6, 5)
        a.grad, b.grad = g.clone(), g.clone()
        ours.step(), ref.step()
    assert torch.allclose(a, b, atol=1e-6)
    # with sparse gradients: state for the union of the entries ever touched, the rest untouched
    p = mark_sparse(nn.Parameter(torch.zeros(100, 50)))
    opt = SparseStateAdamW([p], lr=1e-2)
    touched = set()
    for step in range(4):
        g = torch.zeros(5000)
        idx = torch.randperm(5000)[:30]
        g[idx] = torch.randn(30)
        touched |= set(idx.tolist())
        p.grad = g.view(100, 50)
        opt.step()
    assert set(opt.state[p]["index"].tolist()) == touched == set(torch.nonzero(p.view(-1)).squeeze(1).tolist())
    assert state_bytes(opt) == len(touched) * (8 + 4 + 4)  # index, two moments


def test_training_reverts_to_plain_linear_layers_with_equal_outputs(bert):
    cfg = lf.SparseGrad(budget_rank=1)
    cfg.fit_basis(bert, batches(3))
    lf.adapt(bert, cfg)
    params = [p for p in bert.parameters() if p.requires_grad]
    opt = SparseStateAdamW(params, lr=1e-2)
    bert.train()
    for b in batches(6, seed=2):
        opt.zero_grad()
        bert(**b).loss.backward()
        opt.step()
    touched = touched_entries(bert)
    assert all(0 < t <= 6 * (32 + 64) for t in touched.values())  # at most k entries a step
    assert state_bytes(opt) < sum(p.numel() for p in params) * 8  # less than AdamW's two dense moments
    bert.eval()
    ids = batches(1, seed=9)[0]["input_ids"]
    trained = bert(input_ids=ids).logits
    lf.merge(bert)
    strip_adapters(bert)
    assert all(type(bert.get_submodule(n)) is nn.Linear for n in mlp_names(bert))
    assert torch.allclose(bert(input_ids=ids).logits, trained, atol=1e-5)


def test_save_and_load_restore_the_basis(bert, tmp_path, tokenizer):
    cfg = lf.SparseGrad(topk=50)
    cfg.fit_basis(bert, batches(3))
    lf.adapt(bert, cfg, name="sg")
    with torch.no_grad():
        for n, layer in bert.named_modules():
            if isinstance(layer, SparseGradModule):
                layer.delta.normal_(0, 0.05)
    ids = batches(1, seed=3)[0]["input_ids"]
    expected = bert(input_ids=ids).logits
    lf.save(bert, tokenizer, tmp_path / "sg")
    entry = json.loads((tmp_path / "sg" / "leanformer.json").read_text())
    assert "bases" not in json.dumps(entry)  # tensors go to safetensors, not the config
    loaded, _ = lf.load(tmp_path / "sg")
    assert torch.allclose(loaded(input_ids=ids).logits, expected, atol=1e-6)


def test_bad_input_gives_clear_errors(bert, make_tiny_llama):
    with pytest.raises(LeanformerError, match=r"top-k 5000 is larger than layer .*64×32 = 2048"):
        lf.adapt(bert, lf.MeProp(topk=5000))
    with pytest.raises(LeanformerError, match="needs its gradient basis first"):
        lf.adapt(bert, lf.SparseGrad())
    with pytest.raises(LeanformerError, match="topk or budget_rank|positive integer"):
        lf.SparseGrad(topk=0)

    class NoMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.ModuleDict({"attn": nn.Linear(4, 4)}) for _ in range(2)])

    with pytest.raises(LeanformerError, match=r"MLP up- and down-projections \(roles mlp_in, mlp_out\)"):
        lf.adapt(NoMLP(), lf.MeProp(topk=1))
    # a Llama's up / down projections are found by role
    llama = make_tiny_llama(layers=2)
    lf.adapt(llama, lf.MeProp(topk=3))
    chosen = [n for n, m in llama.named_modules() if isinstance(m, SparseGradModule)]
    assert len(chosen) == 4 and all("up_proj" in n or "down_proj" in n for n in chosen)

"""Dense → dynamic-k mixture of experts (D2DMoE / DSTI: Piórczyński, Szatkowski, Bałazy, Wójcik,
"Exploiting Activation Sparsity with Dense to Dynamic-k Mixture-of-Experts Conversion", NeurIPS 2024).

`moefy(model, DSTI(experts=E, tau=τ, rule=...), tokenizer=tok, calibration=texts)` turns every
block's MLP into E experts and a router, in place:

1. Experts (paper §3.2; authors' architectures/moe/moefication.py, param_clustering_split): the rows
   of the MLP's first layer W1 are L2-normalised and clustered into E groups of equal size
   d_ff / E (when E does not divide d_ff, of sizes that differ by one: see MoEMLP); each expert
   keeps its neurons' W1 rows (and bias) and W2 columns, so running every
   expert reproduces the dense MLP. Gated MLPs (Llama: down(act(gate·x) ⊙ up·x)) are clustered
   on the gate rows, where the activation (and so the sparsity) is, as the authors do for Gemma;
   each neuron's up row goes with its gate row. Equal sizes come from a greedy size-constrained
   assignment (each neuron to its nearest centroid that still has room, pairs taken in order of
   distance) inside Lloyd iterations — the authors use k-means-constrained's min-cost flow, which
   this approximates without the dependency.
2. Routers (§3.3; methods/dynamic_sparsification/train_routers.py, MoeficationRouter): per layer a
   2-layer MLP (router_width, ReLU, |·| on the output) regresses, by MSE, the L2 norm of each
   expert's output on calibration tokens; the backbone stays frozen.
3. Dynamic k (§3.4; MoeficationMoE.gate): per token, with r the predicted norms,
     dynk_max  run expert e iff r_e ≥ (1 − τ)·max r
     dynk      take experts by decreasing share r_e / Σr until the shares taken reach τ
   at least one expert per token either way; τ = 1 runs every expert (the dense MLP, without asking
   the router: the authors' dynk would still skip experts predicted at exactly 0), τ = 0 one.
   "topk" (static top-k, MoEfication, Zhang et al. 2022) runs the k best-predicted experts.
4. Execution: the (token, expert) pairs are sorted by expert; each expert with tokens runs its
   own W1 rows on only the rows routed to it and adds its W2 columns' output back (index_add_),
   as the authors' CPU path does (moe_layers.py, ModuleBatchedExperts.forward). Experts no token
   chose are never touched. When a forward selects every expert for every token, the whole MLP runs
   as two matmuls.
5. Cost: every forward adds its executed expert-tokens and router calls to the module's counters;
   `leanformer.dynamic.cost(model)` turns them into fractions of the dense FLOPs
   (executed expert-tokens × per-expert FLOPs + tokens × router FLOPs, paper eq. 5).

The sparsity phase before it (ReLU activations + square-Hoyer or L1 on MLP activations) is
`relu_mlp(model)` and `finetune(..., sparsity_reg=...)` (train/regularizers.py).

Saving: `moefy` pushes an Applied("moefy") entry; `lf.save` stores the experts, routers and the
neuron permutation in leanformer.safetensors and `lf.load` rebuilds the modules (`replay`).
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..architectures import find_blocks, find_mlp_activation, role_layers
from ..capture import _valid_tokens
from ..configs import check_positive, with_overrides
from ..errors import LeanformerError
from ..stack import Applied, applied, push
from ..targets import dense_weight, linear_layers, set_module
from ..text import batches
from . import DynamicKind, register
from .flops import DENSE_MLP_ATTR, dense_flops_per_token

RULES = ("dynk_max", "dynk", "topk")
EXPERT_SIZE = 24  # neurons per expert when `experts` is not given: the paper's BERT-base split (3072 / 128)


@dataclass
class DSTI:
    """How to split each MLP into experts and route tokens among them."""
    experts: int | None = field(default=None, metadata={
        "help": "experts per MLP (none: width / 24, the paper's expert size: BERT-base's 3072 neurons → 128 experts, "
                "minilm's 1536 → 64); when it does not divide the width, expert sizes differ by one neuron"})
    tau: float = field(default=0.9, metadata={
        "help": "routing threshold τ in [0, 1]: 1 runs every expert (the dense MLP), lower runs fewer; "
                "changeable after moefy (leanformer eval --tau)"})
    rule: str = field(default="dynk_max", metadata={
        "help": "dynk_max: experts whose predicted output norm ≥ (1 − τ)·max; dynk: the largest predicted "
                "shares until they sum to τ; topk: the k best (static MoEfication)", "choices": RULES})
    k: int = field(default=1, metadata={"help": "rule topk: experts per token"})
    router_width: int = field(default=128, metadata={"help": "hidden width of each layer's 2-layer router"})
    router_epochs: int = field(default=5, metadata={"help": "passes of router training over the calibration tokens"})
    router_lr: float = field(default=1e-3, metadata={"help": "Adam learning rate of the routers"})
    router_batch_size: int = field(default=256, metadata={"help": "calibration tokens per router step"})
    tokens: int = field(default=16384, metadata={"help": "calibration tokens (routers are trained on them)"})
    max_seq_length: int = field(default=128, metadata={"help": "tokens per calibration sequence"})
    batch_size: int = field(default=8, metadata={"help": "calibration sequences per forward pass"})
    kmeans_iters: int = field(default=20, metadata={"help": "Lloyd iterations of the balanced clustering"})
    seed: int = field(default=0, metadata={"help": "seed of the clustering and the router initialisation"})

    def __post_init__(self):
        check_positive(self, "experts", "k", "router_width", "router_epochs", "router_lr", "router_batch_size",
                       "tokens", "max_seq_length", "batch_size", "kmeans_iters")
        if self.rule not in RULES:
            raise LeanformerError(f"rule {self.rule!r} is not one of {', '.join(RULES)}")
        from . import check_tau
        self.tau = check_tau(self.tau)

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# The MoE layer


class MoEMLP(nn.Module):
    """One block's MLP (`width` neurons) as `experts` experts and a router.

    Experts hold ⌈width / experts⌉ neurons (s); when experts does not divide width, the last ones hold
    one neuron less, padded with a zero neuron (zero W1 row and bias, zero W2 column: it adds exactly
    0, and the cost counts real neurons only).
    w_in (E, s·g, d): each expert's W1 rows (g = 2 for a gated MLP: its gate rows, then its up rows);
    b_in (E, s·g) or None; w_out (E, s, d_out): each expert's W2 columns, transposed; b_out (d_out)
    or None; neurons (E·s): the dense MLP's neuron index of each expert neuron, in expert order (−1:
    padding); sizes (E): real neurons per expert."""

    def __init__(self, d_in: int, d_out: int, experts: int, width: int, gated: bool, bias_in: bool,
                 bias_out: bool, activation: nn.Module, router_width: int, rule: str = "dynk_max", tau: float = 0.9,
                 k: int = 1):
        super().__init__()
        g = 2 if gated else 1
        expert_size = -(-width // experts)
        self.d_in, self.d_out, self.experts, self.expert_size, self.gated = d_in, d_out, experts, expert_size, gated
        self.width = width
        self.w_in = nn.Parameter(torch.zeros(experts, expert_size * g, d_in))
        self.b_in = nn.Parameter(torch.zeros(experts, expert_size * g)) if bias_in else None
        self.w_out = nn.Parameter(torch.zeros(experts, expert_size, d_out))
        self.b_out = nn.Parameter(torch.zeros(d_out)) if bias_out else None
        self.register_buffer("neurons", torch.full((experts * expert_size,), -1))
        self.register_buffer("sizes", torch.tensor(expert_sizes(width, experts)))
        self.act = activation
        self.router = nn.Sequential(nn.Linear(d_in, router_width), nn.ReLU(), nn.Linear(router_width, experts))
        self.rule, self.tau, self.k = rule, tau, k
        self.dynamic_rule = rule if rule != "topk" else "dynk_max"  # the rule set_tau returns to after set_top_k
        # per-token FLOPs (flops.py's rule: 2 per multiply-add)
        self.neuron_flops = 2 * d_in * g + 2 * d_out
        self.router_flops = 2 * d_in * router_width + 2 * router_width * experts
        setattr(self, DENSE_MLP_ATTR, width * self.neuron_flops)
        self.reset_cost()

    # --- cost counters -------------------------------------------------------------------------
    def reset_cost(self) -> None:
        # seq_len → [tokens, executed (token, expert) pairs, router calls, executed (token, real neuron) pairs]
        self.seen: dict[int, list[int]] = {}
        self.rows_run = 0  # (token, expert) rows the expert matmuls ran on: skipped experts add none

    # --- routing -------------------------------------------------------------------------------
    def predicted_norms(self, x: torch.Tensor) -> torch.Tensor:
        return self.router(x).abs()

    def select(self, norms: torch.Tensor) -> torch.Tensor:
        """(N, E) bool: which experts each token runs (at least one)."""
        if self.rule == "topk":
            top = norms.topk(min(self.k, self.experts), dim=-1).indices
            return torch.zeros_like(norms, dtype=torch.bool).scatter_(-1, top, True)
        if self.tau >= 1.0:
            return torch.ones_like(norms, dtype=torch.bool)
        if self.rule == "dynk_max":
            return norms >= (1.0 - self.tau) * norms.max(dim=-1, keepdim=True).values
        shares = norms / norms.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(norms.dtype).tiny)
        ordered, order = shares.sort(dim=-1, descending=True)
        below = ordered.cumsum(-1) < self.tau
        # the expert that crosses τ is taken too, and the first always (MoeficationMoE.gate's roll)
        take = torch.cat([torch.ones_like(below[:, :1]), below[:, :-1]], dim=-1)
        return torch.zeros_like(take).scatter_(-1, order, take)

    # --- forward -------------------------------------------------------------------------------
    def _hidden_all(self, x: torch.Tensor) -> torch.Tensor:
        """(rows, E·s): every neuron's activation for the rows of x (the dense path; router targets)."""
        w, b = self.w_in.reshape(-1, self.d_in), None if self.b_in is None else self.b_in.reshape(-1)
        if self.gated:  # the flat layout interleaves the experts' gate and up halves: split per expert
            h = nn.functional.linear(x, w, b).view(x.shape[0], self.experts, 2, self.expert_size)
            return (self.act(h[:, :, 0]) * h[:, :, 1]).reshape(x.shape[0], -1)
        return self.act(nn.functional.linear(x, w, b))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, self.d_in)
        n = x.shape[0]
        dense = self.tau >= 1.0 and self.rule != "topk"  # every expert is chosen: no need to ask the router
        chosen = None if dense else self.select(self.predicted_norms(x))
        counts = None if dense else chosen.sum(0)
        pairs = n * self.experts if dense else int(counts.sum())
        seq_len = int(shape[-2]) if len(shape) >= 3 else 1
        seen = self.seen.setdefault(seq_len, [0, 0, 0, 0])
        seen[0] += n
        seen[1] += pairs
        seen[2] += 0 if dense else n
        seen[3] += n * self.width if dense else int((counts * self.sizes).sum())
        if pairs == n * self.experts:  # every expert for every token: the dense MLP, two matmuls
            self.rows_run += n * self.experts
            out = self._hidden_all(x) @ self.w_out.reshape(-1, self.d_out)
        else:
            out = self._grouped(x, chosen, counts, pairs)
        if self.b_out is not None:
            out = out + self.b_out
        return out.reshape(*shape[:-1], self.d_out)

    def _grouped(self, x: torch.Tensor, chosen: torch.Tensor, counts: torch.Tensor, pairs: int) -> torch.Tensor:
        """Run each expert on only the tokens routed to it and add its output back to those tokens.

        Pass 1 gathers each expert's rows and computes its neurons' pre-activations into one
        (pairs × neurons) buffer; one activation call covers them all (per-call overhead dominates
        tiny per-expert tensors); pass 2 multiplies each expert's activations by its W2 columns and
        adds them back to its tokens. Per expert, the gathered rows stay in cache (gathering every
        pair's rows at once would cost pairs × width of memory traffic twice over)."""
        _, token_of = chosen.t().nonzero(as_tuple=True)  # tokens of the (token, expert) pairs, by expert
        sizes = counts.tolist()
        groups = token_of.split(sizes)
        w_in, w_out = self.w_in.unbind(0), self.w_out.unbind(0)
        b_in = self.b_in.unbind(0) if self.b_in is not None else None
        pre = x.new_empty(pairs, self.w_in.shape[1])
        spans, start = [], 0
        for e, c in enumerate(sizes):
            if c:
                rows, into = groups[e], pre[start:start + c]
                if b_in is None:
                    torch.mm(x.index_select(0, rows), w_in[e].t(), out=into)
                else:
                    torch.addmm(b_in[e], x.index_select(0, rows), w_in[e].t(), out=into)
                spans.append((e, start, c))
                start += c
        s = self.expert_size
        h = self.act(pre[:, :s]) * pre[:, s:] if self.gated else self.act(pre)
        out = x.new_zeros(x.shape[0], self.d_out)
        for e, start, c in spans:
            out.index_add_(0, groups[e], h[start:start + c] @ w_out[e])
        self.rows_run += pairs
        self.last_run = [(e, c) for e, _, c in spans]  # (expert, rows) of the last grouped forward
        return out

    def extra_repr(self) -> str:
        return (f"d_in={self.d_in}, d_out={self.d_out}, width={self.width}, "
                f"experts={self.experts}×≤{self.expert_size}"
                f"{', gated' if self.gated else ''}, rule={self.rule}, tau={self.tau}")


class PassThrough(nn.Module):
    """Stands in for an MLP output layer whose work a MoEMLP upstream already did (BERT's output.dense:
    the MoEMLP replaces `intermediate` and returns the MLP's output, bias included; BertOutput then
    adds the residual and normalises)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


# ---------------------------------------------------------------------------------------------
# Finding each block's MLP


@dataclass
class MLPSite:
    """Where one block's MLP lives and how a MoEMLP replaces it."""
    block: int
    mlp_in: str  # full names of the layers
    mlp_gate: str | None
    mlp_out: str
    replace: str  # full name of the module the MoEMLP replaces
    passthrough: str | None  # full name of the output layer turned into a pass-through, if any


def _parent(name: str) -> str:
    return name.rpartition(".")[0]


def find_mlps(model: nn.Module) -> list[MLPSite]:
    """Each block's MLP: its input (and gate) and output layers, found through the architecture table
    (architectures.role_layers), and the module a MoEMLP replaces: the module holding all of them
    (Llama's `mlp`), or, when input and output sit in sibling modules (BERT's `intermediate.dense`
    + activation, `output.dense` + residual + LayerNorm), the input's module, with the output layer
    made a pass-through."""
    looked = ("an MLP input layer (role mlp_in: intermediate.dense, up_proj, fc1, c_fc, lin1, …) and output layer "
              "(role mlp_out: output.dense, down_proj, fc2, c_proj, lin2, …) in every block, with the activation "
              "between them (intermediate_act_fn, act_fn, activation_fn, act)")
    try:
        blocks, prefix = find_blocks(model)
        ins, outs = role_layers(model, ("mlp_in",)), role_layers(model, ("mlp_out",))
    except LeanformerError as e:
        raise LeanformerError(f"{type(model).__name__} has no recognisable MLP: looked for {looked}. {e}") from e
    try:
        gates = role_layers(model, ("mlp_gate",))
    except LeanformerError:
        gates = []
    if len(ins) != len(blocks) or len(outs) != len(blocks) or gates and len(gates) != len(blocks):
        raise LeanformerError(f"{type(model).__name__}: expected one MLP per block ({len(blocks)} blocks) but found "
                              f"{len(ins)} input, {len(outs)} output and {len(gates)} gate layers; looked for {looked}")
    sites = []
    for i, block in enumerate(blocks):
        mlp_in, mlp_out, gate = ins[i], outs[i], gates[i] if gates else None
        if mlp_in == gate:
            raise LeanformerError(f"{mlp_in}: a fused gate+up layer is not supported by moefy; looked for {looked}")
        act = find_mlp_activation(model, block)
        if act is None:
            raise LeanformerError(f"{prefix}.{i}: no MLP activation module found; looked for {looked}")
        act_name = f"{prefix}.{i}." + next(n for n, m in block.named_modules() if m is act)
        block_name = f"{prefix}.{i}"
        common = _parent(mlp_in)
        if common != block_name and _parent(mlp_out) == common and (gate is None or _parent(gate) == common) \
                and act_name.startswith(common + "."):
            sites.append(MLPSite(i, mlp_in, gate, mlp_out, common, None))
        elif gate is None and _parent(mlp_in) != block_name and act_name.startswith(_parent(mlp_in) + ".") \
                and _parent(mlp_out) != _parent(mlp_in):
            sites.append(MLPSite(i, mlp_in, gate, mlp_out, _parent(mlp_in), mlp_out))
        else:
            raise LeanformerError(
                f"{block_name}: its MLP ({mlp_in} → {act_name} → {mlp_out}) is computed by the block's own "
                f"forward, not by a module moefy can replace; looked for {looked} inside one MLP module (Llama's "
                "mlp) or an input module holding the activation (BERT's intermediate)")
    return sites


# ---------------------------------------------------------------------------------------------
# Clustering


def expert_sizes(width: int, experts: int) -> list[int]:
    """Neurons per expert: width / experts each, or, when that is not whole, sizes that differ by one
    (the first width mod experts experts one larger)."""
    return [width // experts + (1 if e < width % experts else 0) for e in range(experts)]


def balanced_kmeans(points: torch.Tensor, clusters: int, iters: int = 20, seed: int = 0) -> torch.Tensor:
    """Labels (n,) putting expert_sizes(n, clusters)[c] points in cluster c (n / clusters each when it
    divides), by cosine distance between L2-normalised points and centroids (see the module doc)."""
    n = points.shape[0]
    sizes = expert_sizes(n, clusters)
    x = nn.functional.normalize(points.float(), dim=1)
    g = torch.Generator().manual_seed(seed)
    centroids = x[torch.randperm(n, generator=g)[:clusters]].clone()
    labels: list[int] = []
    for _ in range(iters):
        distance = 1 - x @ nn.functional.normalize(centroids, dim=1).t()  # (n, clusters)
        room, assigned, left = list(sizes), [-1] * n, n
        for flat in distance.flatten().argsort().tolist():  # closest (point, cluster) pairs first
            point, cluster = divmod(flat, clusters)
            if assigned[point] < 0 and room[cluster]:
                assigned[point] = cluster
                room[cluster] -= 1
                left -= 1
                if not left:
                    break
        if assigned == labels:
            break
        labels = assigned
        centroids = nn.functional.one_hot(torch.tensor(labels), clusters).to(x.dtype).t() @ x  # each cluster's sum
    labels = torch.tensor(labels)
    return labels


# ---------------------------------------------------------------------------------------------
# Calibration


def _calibration_chunks(tokenizer, calibration, config: DSTI) -> list[list[int]]:
    """Token id sequences from calibration texts, (text_a, text_b) pairs or a Task (its train split)."""
    from ..tasks import calibration_chunks

    chunks = calibration_chunks(tokenizer, calibration, config.max_seq_length, config.tokens,
                                "moefy (to train its routers)")
    if sum(len(c) for c in chunks) < config.router_batch_size:
        raise LeanformerError(f"calibration gives {sum(len(c) for c in chunks)} tokens; the routers need at least "
                              f"router_batch_size ({config.router_batch_size}) — pass more text")
    return chunks


@torch.no_grad()
def _mlp_inputs(model: nn.Module, tokenizer, chunks, sites: list[MLPSite], config: DSTI) -> list[torch.Tensor]:
    """Each block's MLP input on the calibration tokens (padding removed), float32 on the CPU."""
    layers = linear_layers(model)
    seen: list[list[torch.Tensor]] = [[] for _ in sites]
    mask_now: list[torch.Tensor] = []
    handles = [layers[s.mlp_in].register_forward_pre_hook(
        lambda _m, args, i=i: seen[i].append(_valid_tokens(args[0], mask_now[0], sites[i].mlp_in).float().cpu()))
        for i, s in enumerate(sites)]
    device = next(model.parameters()).device
    body = getattr(model, "base_model", model)
    try:
        for batch in tqdm(batches(tokenizer, chunks, config.batch_size), total=-(-len(chunks) // config.batch_size),
                          desc="moefy: calibrate", leave=False):
            mask_now[:] = [batch["attention_mask"].to(device).bool()]
            body(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
    finally:
        for h in handles:
            h.remove()
    return [torch.cat(s) for s in seen]


def _train_router(moe: MoEMLP, inputs: torch.Tensor, config: DSTI, desc: str) -> float:
    """Fit moe.router by MSE to each expert's output norm on `inputs`; returns the last epoch's mean loss."""
    with torch.no_grad():
        targets = torch.cat([_expert_norms(moe, inputs[s:s + 1024]) for s in range(0, inputs.shape[0], 1024)])
    params = list(moe.router.parameters())
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=config.router_lr)
    g = torch.Generator().manual_seed(config.seed)
    n = inputs.shape[0]
    loss_sum = 0.0
    for _ in tqdm(range(config.router_epochs), desc=desc, leave=False):
        order = torch.randperm(n, generator=g)
        loss_sum, steps = 0.0, 0
        for s in range(0, n, config.router_batch_size):
            idx = order[s:s + config.router_batch_size]
            loss = nn.functional.mse_loss(moe.predicted_norms(inputs[idx]), targets[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum, steps = loss_sum + float(loss.detach()), steps + 1
        loss_sum /= max(steps, 1)
    for p in params:
        p.requires_grad_(False)
    return loss_sum


def _expert_norms(moe: MoEMLP, x: torch.Tensor) -> torch.Tensor:
    """(n, E): ‖output of expert e‖₂ for each row of x (the router's regression target)."""
    h = moe._hidden_all(x).view(x.shape[0], moe.experts, moe.expert_size)
    return torch.einsum("nes,esd->ned", h, moe.w_out).norm(dim=-1)


# ---------------------------------------------------------------------------------------------
# The verb


def _empty_moe(model: nn.Module, site: MLPSite, layers: dict, config: dict, block_act: nn.Module) -> MoEMLP:
    in_f, d_ff = _shape(layers[site.mlp_in])
    d_ff_out, d_out = _shape(layers[site.mlp_out])
    experts = int(config["experts"] or max(1, round(d_ff / EXPERT_SIZE)))
    if experts > d_ff:
        raise LeanformerError(f"experts={experts} is more than the {d_ff} neurons of the MLP at {site.mlp_in}: "
                              f"each expert needs at least one; use at most {d_ff}")
    return MoEMLP(in_f, d_out, experts, d_ff, site.mlp_gate is not None,
                  getattr(layers[site.mlp_in], "bias", None) is not None,
                  getattr(layers[site.mlp_out], "bias", None) is not None, copy.deepcopy(block_act),
                  int(config["router_width"]), config["rule"], float(config["tau"]), int(config["k"]))


def _shape(layer: nn.Module) -> tuple[int, int]:
    w = dense_weight(layer)
    return int(w.shape[1]), int(w.shape[0])


def _install(model: nn.Module, site: MLPSite, moe: MoEMLP) -> None:
    set_module(model, site.replace, moe)
    if site.passthrough:
        set_module(model, site.passthrough, PassThrough())


def _block_activation(model: nn.Module, index: int) -> nn.Module:
    blocks, _ = find_blocks(model)
    return find_mlp_activation(model, blocks[index])


@torch.no_grad()
def _fill_experts(moe: MoEMLP, layers: dict, site: MLPSite, config: DSTI) -> None:
    w1 = dense_weight(layers[site.mlp_in]).detach().float()
    w2 = dense_weight(layers[site.mlp_out]).detach().float()  # (d_out, d_ff)
    b1 = getattr(layers[site.mlp_in], "bias", None)
    gate = dense_weight(layers[site.mlp_gate]).detach().float() if site.mlp_gate else None
    gate_bias = getattr(layers[site.mlp_gate], "bias", None) if site.mlp_gate else None
    labels = balanced_kmeans(gate if gate is not None else w1, moe.experts, config.kmeans_iters, config.seed)
    e, s, width = moe.experts, moe.expert_size, moe.width
    # slot j of expert i holds dense neuron slots[i·s + j]; `width` (one past the last) marks padding
    slots = torch.full((e, s), width, dtype=torch.long)
    for i in range(e):
        mine = (labels == i).nonzero().flatten()
        slots[i, :mine.numel()] = mine
    slots = slots.flatten()

    def rows_of(w: torch.Tensor) -> torch.Tensor:  # (width, …) → (E, s, …), zero rows at padding
        return torch.cat([w, w.new_zeros(1, *w.shape[1:])])[slots].view(e, s, *w.shape[1:])

    rows = rows_of(w1)
    moe.w_in.copy_(torch.cat([rows_of(gate), rows], 1) if gate is not None else rows)
    if moe.b_in is not None:
        b = rows_of(b1.detach().float())
        moe.b_in.copy_(torch.cat([rows_of(gate_bias.detach().float()), b], 1) if gate is not None else b)
    moe.w_out.copy_(rows_of(w2.t()))
    if moe.b_out is not None:
        moe.b_out.copy_(layers[site.mlp_out].bias.detach().float())
    moe.neurons.copy_(torch.where(slots == width, -1, slots))


def moefy(model: nn.Module, config: DSTI | None = None, *, tokenizer=None, calibration=None, **overrides) -> dict:
    """Turn every block's MLP of `model` into a dynamic-k mixture of experts, in place (see the module
    doc). calibration: texts, (text_a, text_b) pairs or a Task (its train split), tokenized with
    `tokenizer`; the routers are trained on up to config.tokens of its tokens. Returns a report:
    per layer the router's final MSE and the mean experts per token on the calibration tokens at τ."""
    config = with_overrides(DSTI, config, overrides)
    if any(e.transform == "moefy" for e in applied(model)):
        raise LeanformerError("the model is already moefied")
    sites = find_mlps(model)
    layers = linear_layers(model)
    moes = [_empty_moe(model, s, layers, config.to_dict(), _block_activation(model, s.block)) for s in sites]
    if tokenizer is None:
        raise LeanformerError("moefy needs the model's tokenizer (tokenizer=) to read the calibration text")
    chunks = _calibration_chunks(tokenizer, calibration, config)
    inputs = _mlp_inputs(model, tokenizer, chunks, sites, config)
    device = next(model.parameters()).device
    torch.manual_seed(config.seed)
    report = {"experts": moes[0].experts, "neurons_per_expert": moes[0].sizes.tolist(), "layers": [],
              "calibration_tokens": int(inputs[0].shape[0])}
    for site, moe, x in tqdm(list(zip(sites, moes, inputs)), desc="moefy: experts + routers"):
        moe.to(device)
        _fill_experts(moe, layers, site, config)
        moe.requires_grad_(False)
        mse = _train_router(moe, x.to(device), config, f"router {site.block}")
        with torch.no_grad():
            chosen = moe.select(moe.predicted_norms(x.to(device)))
        moe.to(dtype=dense_weight(layers[site.mlp_in]).dtype)  # trained in float32, run in the model's dtype
        report["layers"].append({"block": site.block, "router_mse": mse,
                                 "experts_per_token": float(chosen.sum(1).float().mean())})
    was_training = model.training
    for site, moe in zip(sites, moes):
        _install(model, site, moe)
    model.train(was_training)
    state = {"sites": [asdict(s) for s in sites], "shapes": [[m.d_in, m.width, m.d_out] for m in moes]}
    push(model, Applied("moefy", config, state))
    return report


def replay(model: nn.Module, config: dict, state: dict) -> None:
    """Rebuild the MoE modules of a saved moefied model (empty; the tensor load fills them)."""
    sites = [MLPSite(**s) for s in state["sites"]]
    found = {(s.mlp_in, s.mlp_out) for s in find_mlps(model)}
    missing = [s.mlp_in for s in sites if (s.mlp_in, s.mlp_out) not in found]
    if missing:
        raise LeanformerError(f"the saved moefied model does not fit this base: it records MLPs at {missing[:3]}, "
                              f"which the base ({type(model).__name__}) does not have; load it onto the base it was "
                              "made from")
    layers = linear_layers(model)
    for site, recorded in zip(sites, state.get("shapes", [])):
        here = [_shape(layers[site.mlp_in])[0], _shape(layers[site.mlp_in])[1], _shape(layers[site.mlp_out])[1]]
        if here != recorded:
            raise LeanformerError(
                f"the saved moefied model was made from a base whose MLP {site.mlp_in} → {site.mlp_out} has "
                f"(input, width, output) {tuple(recorded)}; this base's has {tuple(here)}: load it onto the base it "
                "was made from")
    moes = [_empty_moe(model, s, layers, config, _block_activation(model, s.block)) for s in sites]
    for site, moe in zip(sites, moes):
        _install(model, site, moe)
    push(model, Applied("moefy", DSTI(**config), state))


# ---------------------------------------------------------------------------------------------
# Switching the MLP activation to ReLU (the sparsity phase's first step)


def relu_mlp(model: nn.Module) -> list[str]:
    """Replace every block's MLP activation (GELU, SiLU, …) by ReLU, in place, and record it on the
    stack. Why: dynamic-k routing saves compute only where many neurons are exactly zero; ReLU
    gives exact zeros, GELU and SiLU almost never do (paper §3.1; the authors' replace_with_relu in
    architectures/moe/dsti.py). Fine-tune afterwards (with sparsity_reg) to recover the accuracy.
    Returns the names of the replaced modules."""
    if any(e.transform == "moefy" for e in applied(model)):
        raise LeanformerError("switch the MLP activations to ReLU before moefy, not after")
    names = _activation_names(model)
    entry = push(model, Applied("relu_mlp", {}, {"modules": names}))  # records the base (its activation) first
    _swap_activations(model, names)
    return entry.state["modules"]


def _activation_names(model: nn.Module) -> list[str]:
    blocks, prefix = find_blocks(model)
    names = []
    for i, block in enumerate(blocks):
        act = find_mlp_activation(model, block)
        if act is None:
            raise LeanformerError(f"{prefix}.{i}: no MLP activation module found (looked for the architecture "
                                  "table's, then a leaf named intermediate_act_fn, act_fn, activation_fn, act or "
                                  "activation)")
        names.append(f"{prefix}.{i}." + next(n for n, m in block.named_modules() if m is act))
    return names


def _swap_activations(model: nn.Module, names: list[str]) -> None:
    for name in names:
        set_module(model, name, nn.ReLU())
    config = getattr(model, "config", None)
    if isinstance(getattr(config, "hidden_act", None), str):
        config.hidden_act = "relu"  # so a saved config.json builds ReLU MLPs under plain from_pretrained too


def replay_relu(model: nn.Module, config: dict, state: dict) -> None:
    entry = push(model, Applied("relu_mlp", config, state))
    _swap_activations(model, _activation_names(model))
    entry.state = state


# ---------------------------------------------------------------------------------------------
# The dynamic-inference contract (leanformer.dynamic)


def moe_layers(model: nn.Module) -> list[MoEMLP]:
    return [m for m in model.modules() if isinstance(m, MoEMLP)]


def _set_tau(model: nn.Module, tau: float) -> None:
    for m in moe_layers(model):
        m.tau = tau
        m.rule = m.dynamic_rule  # τ asks for dynamic k (after set_top_k asked for static)


def set_top_k(model: nn.Module, k: int) -> None:
    """Run the k best-predicted experts per token in every MoE layer (static top-k, MoEfication)."""
    layers = moe_layers(model)
    if not layers:
        raise LeanformerError(f"{type(model).__name__} has no MoE layers: moefy it first")
    if not 1 <= int(k) <= layers[0].experts:
        raise LeanformerError(f"k must be in 1..{layers[0].experts} (the experts per layer), got {k}")
    for m in layers:
        if m.rule != "topk":
            m.dynamic_rule = m.rule
        m.rule, m.k = "topk", int(k)


def set_rule(model: nn.Module, rule: str) -> None:
    if rule not in RULES:
        raise LeanformerError(f"rule {rule!r} is not one of {', '.join(RULES)}")
    for m in moe_layers(model):
        m.rule = rule
        if rule != "topk":
            m.dynamic_rule = rule


def _reset_cost(model: nn.Module) -> None:
    for m in moe_layers(model):
        m.reset_cost()


def _cost(model: nn.Module) -> dict:
    """Executed FLOPs since the last reset as fractions of the dense model's (flops.py's counting)."""
    layers = moe_layers(model)
    tokens = sum(s[0] for s in layers[0].seen.values()) if layers else 0
    if not tokens:
        return {"mlp_flops_per_token": None, "flops_per_token": None, "tokens": 0, "experts_per_token": None,
                "router_flops_share": None}
    router = sum(s[2] * m.router_flops for m in layers for s in m.seen.values())
    executed_mlp = sum(s[3] * m.neuron_flops for m in layers for s in m.seen.values()) + router
    dense_mlp = sum(s[0] * getattr(m, DENSE_MLP_ATTR) for m in layers for s in m.seen.values())
    attention = sum(n_tokens * dense_flops_per_token(model, seq_len)["attention"]
                    for seq_len, (n_tokens, *_) in layers[0].seen.items())
    pairs = sum(s[1] for m in layers for s in m.seen.values())
    layer_tokens = sum(s[0] for m in layers for s in m.seen.values())
    return {"mlp_flops_per_token": executed_mlp / dense_mlp,
            "flops_per_token": (attention + executed_mlp) / (attention + dense_mlp),
            "tokens": tokens,
            "experts_per_token": pairs / layer_tokens,
            "expert_fraction": pairs / (layer_tokens * layers[0].experts),
            "router_flops_share": router / dense_mlp}


register(DynamicKind("moefy", "routing threshold: experts run per token grow with τ (1 = all, the dense MLP)",
                     _set_tau, _reset_cost, _cost))

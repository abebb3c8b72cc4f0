"""DyLoRA (Valipour et al. 2023): one LoRA trained for every rank b ≤ r_max at once.

Each training step samples b ∈ {1..r_max} (one b for all layers) and uses the first b rows of A and
columns of B with scale α/b, so the components are ordered by importance (nested dropout). With
`frozen=True` the first b−1 components are detached and only component b learns that step.
After training, `set_rank(model, b)` picks any rank without retraining.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LeanformerError
from ..targets import linear_shape
from .base import AdapterModule, LowRankConfig, adapted_layers, register
from .lora import _dropout
from .recipe import Recipe


class DyLoRAModule(AdapterModule):
    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, dropout: float,
                 frozen: bool):
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.alpha, self.max_rank, self.frozen = alpha, rank, frozen
        self.train_rank = rank  # set each step by the model's pre-forward hook
        # The inference rank (set_rank) is a buffer so that it is saved with the adapter.
        self.register_buffer("dylora_rank", torch.tensor(rank, dtype=torch.long))
        self.drop = _dropout(dropout)

    @property
    def eval_rank(self) -> int:
        return int(self.dylora_rank)

    @eval_rank.setter
    def eval_rank(self, b: int) -> None:
        self.dylora_rank.fill_(b)

    def _factors(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        a, bm = self.lora_A[:b], self.lora_B[:, :b]
        if self.training and self.frozen and b > 1:
            a = torch.cat([a[:-1].detach(), a[-1:]], 0)
            bm = torch.cat([bm[:, :-1].detach(), bm[:, -1:]], 1)
        return a, bm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.train_rank if self.training else self.eval_rank
        a, bm = self._factors(b)
        return F.linear(F.linear(self.drop(x), a), bm) * (self.alpha / b)

    def delta_weight(self) -> torch.Tensor:
        b = self.eval_rank
        return (self.lora_B[:, :b] @ self.lora_A[:b]) * (self.alpha / b)

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        b = self.eval_rank
        return self.lora_A[:b].detach(), self.lora_B[:, :b].detach(), b


@register
@dataclass
class DyLoRA(LowRankConfig):
    """LoRA up to `rank` (= r_max), trained with a random rank per step; any rank ≤ r_max at inference."""
    frozen: bool = False
    method = "dylora"
    # huawei-noah/Efficient-NLP, DyLoRA/examples/NLU/roberta_base_mrpc.sh (and _rte.sh): RoBERTa-base,
    # query and value, r_max 8, α 16, lr 4e-4, warm-up ratio 0.06, weight decay 0.1, batch 16. All but the
    # rate is theirs: like LoRA's 5e-4 (see LoRA.recipe), 4e-4 is made for tens of epochs. The rate was
    # checked on a split of SST-2's *training* set (1 000 held-out training sentences, never dev; minilm,
    # 150 steps of 8, seed 0): 84.0 at 2e-3 (LoRA there: 84.8 at 2e-3, 52.2 at 5e-4).
    recipe = Recipe(learning_rate=2e-3, head_learning_rate=None, roles=("q", "v"), alpha=16.0, warmup_ratio=0.06,
                    weight_decay=0.1, source="Valipour et al. 2023 (DyLoRA); Efficient-NLP DyLoRA/examples/NLU/"
                                             "roberta_base_mrpc.sh; lr chosen on a held-out split of SST-2 training "
                                             "data (short budgets)")

    def build(self, base: nn.Linear, name: str) -> DyLoRAModule:
        self.check_rank(base, name)
        return DyLoRAModule(*linear_shape(base), self.rank, self.alpha, self.dropout, self.frozen)

    def on_adapt(self, model: nn.Module, name: str, modules: list[DyLoRAModule]) -> None:
        r_max = self.rank
        # set_adapter switches every wrapper at once, so one of them tells whether this adapter is active
        # (looked up once here: this hook runs before every forward)
        holder = next(layer for _, layer in adapted_layers(model) if name in layer.adapters)

        def sample_rank(_module, _args):
            # One rank per step for every layer, drawn from torch's global RNG (seeded runs repeat).
            if holder.active != name or not model.training:
                return
            b = int(torch.randint(1, r_max + 1, (1,)).item())
            for m in modules:
                m.train_rank = b

        model.register_forward_pre_hook(sample_rank)

    def set_rank(self, modules: list[DyLoRAModule], rank: int) -> None:
        if not isinstance(rank, int) or not 1 <= rank <= self.rank:
            raise LeanformerError(f"dylora: rank must be an integer in 1..{self.rank} (the trained maximum), got {rank!r}")
        for m in modules:
            m.eval_rank = rank

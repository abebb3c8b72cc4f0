"""LoRA (Hu et al. 2021): ΔW = (α/r)·B A, A (r×in) random, B (out×r) zero; the base W stays frozen."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..targets import linear_shape
from .base import LowRankConfig, AdapterModule, register
from .recipe import Recipe


def _dropout(p: float) -> nn.Module:
    return nn.Dropout(p) if p > 0 else nn.Identity()


class LoRAModule(AdapterModule):
    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(rank, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # peft's default init, so runs compare
        self.scaling = alpha / rank
        self.drop = _dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(self.drop(x), self.lora_A), self.lora_B) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(lora_A, lora_B, rank) of an equivalent standard LoRA with the same α: what export writes."""
        return self.lora_A.detach(), self.lora_B.detach(), self.lora_A.shape[0]


@register
@dataclass
class LoRA(LowRankConfig):
    """Low-rank update ΔW = (alpha/rank)·B A on each targeted Linear."""
    method = "lora"
    # Hu et al. 2021, §5.1 and Appendix D (RoBERTa-base on GLUE): Wq and Wv, r = 8, lr 5e-4 (4e-4 on
    # some tasks), warm-up ratio 0.06, linear decay, the head trained at the same rate. α = 16 and weight
    # decay 0.1 as the RoBERTa-base GLUE scripts built on microsoft/LoRA's examples/NLU set them
    # (huawei-noah/Efficient-NLP DyLoRA/examples/NLU/roberta_base_mrpc.sh; LoRA-XS main_glue.py: α 16).
    # All of it is theirs but the learning rate: 5e-4 is made for 30–80 epochs and hardly moves B in the
    # few hundred steps of a small task. The rate was chosen on a split of SST-2's *training* set (1 000
    # held-out training sentences, never dev; minilm, 150 steps of 8, seed 0): accuracy 52.2 at 5e-4
    # (only the head learned), 84.8 at 2e-3, 84.0 at 5e-3.
    recipe = Recipe(learning_rate=2e-3, head_learning_rate=None, roles=("q", "v"), alpha=16.0, warmup_ratio=0.06,
                    weight_decay=0.1, source="Hu et al. 2021 (LoRA) §5.1/App. D; α and weight decay from the "
                                             "microsoft/LoRA-derived NLU scripts; lr chosen on a held-out split of "
                                             "SST-2 training data (short budgets)")

    def build(self, base: nn.Linear, name: str) -> LoRAModule:
        self.check_rank(base, name)
        return LoRAModule(*linear_shape(base), self.rank, self.alpha, self.dropout)

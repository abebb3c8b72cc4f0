"""A method's published recipe for fine-tuning a sequence classifier: what `leanformer finetune`
uses for every setting the user does not pass.

Each method module defines its recipe beside its config (`LoRA.recipe`, `LoRAXS.recipe`, …), each
number with the paper section or authors' script it comes from. Targets are architecture roles
(leanformer.architectures.ROLES: "q", "k", "v", "o", "mlp_in", "mlp_gate", "mlp_out"), resolved
on the model at hand by `adapter_targets`, so a recipe written for RoBERTa's query/value applies
to q_proj/v_proj on Llama or c_attn on GPT-2.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Recipe:
    learning_rate: float                   # for the adapter's parameters (all weights for full fine-tuning)
    head_learning_rate: float | None       # for the classifier head; None: the same as learning_rate
    roles: tuple[str, ...] = ("q", "v")    # layers adapted (architecture roles)
    alpha: float | None = None             # the method's scale (LoRA family: ΔW·alpha/rank; KronA: ΔW·alpha)
    warmup_ratio: float = 0.06             # linear warm-up over this fraction of the steps
    lr_scheduler_type: str = "linear"      # decay after warm-up
    weight_decay: float = 0.0              # AdamW's decoupled weight decay
    source: str = ""                       # where the numbers come from

    def training_arguments(self) -> dict:
        """The transformers.TrainingArguments fields this recipe sets."""
        return dict(learning_rate=self.learning_rate, warmup_steps=self.warmup_ratio, weight_decay=self.weight_decay,
                    lr_scheduler_type=self.lr_scheduler_type)

    def to_json(self) -> dict:
        d = asdict(self)
        d["roles"] = list(self.roles)
        return d


# Full fine-tuning, for comparison and for --method full: BERT (Devlin et al. 2019, Appendix A.3):
# lr from {5e-5, 3e-5, 2e-5} (the largest: our step budgets are short), batch 32, warm-up 10 % of
# the steps, linear decay, weight decay 0.01.
FULL_FINETUNING = Recipe(learning_rate=5e-5, head_learning_rate=None, roles=(), warmup_ratio=0.1,
                         weight_decay=0.01, source="Devlin et al. 2019 (BERT), Appendix A.3")

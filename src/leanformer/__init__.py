"""leanformer: make pretrained transformers cheaper to adapt, store and run, and see where their capacity goes."""
from .adapters import (DyLoRA, KronA, LoRA, LoRAXS, MeProp, SparseGrad, active_adapter, adapt, export_peft, merge,
                       print_trainable_parameters, set_adapter, set_rank, trainable_parameters, unmerge)
from .compress import GPTQ, HQQ, RTN, Kashin, KashinGPTQ, QuantizedLinear, quantize, size_report
from .compress.plan import PlanConfig, QuantPlan, plan
from .compress.prune import LinearReplacement, PruneConfig, prune_layers
from .convert import convert_llama2c
from .dynamic.early_exit import EarlyExit, early_exit
from .dynamic.moe import DSTI, moefy, relu_mlp
from . import dynamic
from .errors import LeanformerError
from .evaluation import EvalConfig, embedding_cosine, evaluate, evaluate_task, perplexity, sentence_embeddings
from .generation import GenerateConfig, generate
from .inspection import InspectConfig, Profile, inspect
from .comparison import Comparison, compare
from .saving import load, save
from .stack import applied
from .train.regularizers import CosineRegularizer
from .train.randomized_backprop import RandomizedBackprop
from . import optim

__version__ = "0.1.0"

# The training verbs run on transformers.Trainer, whose import costs seconds (torch.compile's stack);
# they are imported on first use so that `import leanformer` and `leanformer --help` stay quick.
_TRAINING = {"finetune": "finetuning", "heal": "heal", "pretrain": "pretrain", "PretrainConfig": "pretrain"}


def __getattr__(name: str):
    if name in _TRAINING:
        import importlib

        return getattr(importlib.import_module(f".train.{_TRAINING[name]}", __name__), name)
    raise AttributeError(f"module 'leanformer' has no attribute {name!r}")

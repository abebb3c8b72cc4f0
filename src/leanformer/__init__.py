"""leanformer: make pretrained transformers cheaper to adapt, store and run, and see where their capacity goes."""
from .adapters import (DyLoRA, KronA, LoRA, LoRAXS, active_adapter, adapt, export_peft, merge, print_trainable_parameters,
                    set_adapter, set_rank, trainable_parameters, unmerge)
from .compress import HQQ, RTN, Kashin, QuantizedLinear, quantize, size_report
from .compress.prune import LinearReplacement, prune_layers
from .convert import convert_llama2c
from .errors import LeanformerError
from .evaluation import embedding_cosine, evaluate_task, perplexity, sentence_embeddings
from .inspection import Profile, inspect
from .saving import load, save
from .stack import applied
from .train.pretrain import PretrainConfig, pretrain
from .train.regularizers import CosineRegularizer

__version__ = "0.1.0"

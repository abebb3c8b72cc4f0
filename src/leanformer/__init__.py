"""leanformer: make pretrained transformers cheaper to adapt, store and run, and see where their capacity goes."""
from .errors import LeanformerError
from .evaluate import embedding_cosine, evaluate_task, perplexity, sentence_embeddings
from .inspect import Profile, inspect
from .models import load
from .compress.base import QuantizedLinear, quantize
from .compress.kashin import Kashin
from .compress.rtn import RTN
from .compress.hqq import HQQ
from .compress.size import size_report
from .compress.io import load_quantized, save_quantized
from .adapt import (DyLoRA, KronA, LoRA, LoRAXS, adapt, export_peft, load_adapter, merge, print_trainable_parameters, save_adapter, set_adapter, set_rank, trainable_parameters, unmerge)
from .convert import convert_llama2c
from .compress.prune import LinearReplacement, load_pruned, prune_layers, save_pruned
from .train.regularizers import CosineRegularizer
from .train.pretrain import PretrainConfig, pretrain

__version__ = "0.1.0"

"""leanformer: make pretrained transformers cheaper to adapt, store and run, and see where their capacity goes."""
from .errors import LeanformerError
from .evaluate import embedding_cosine, evaluate_task, perplexity, sentence_embeddings
from .inspect import Profile, inspect
from .models import load
from .adapt import (DyLoRA, KronA, LoRA, LoRAXS, adapt, export_peft, load_adapter, merge, print_trainable_parameters, save_adapter, set_adapter, set_rank, trainable_parameters, unmerge)

__version__ = "0.1.0"

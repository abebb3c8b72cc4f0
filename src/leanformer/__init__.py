"""leanformer: make pretrained transformers cheaper to adapt, store and run, and see where their capacity goes."""
from .errors import LeanformerError
from .evaluate import embedding_cosine, evaluate_task, perplexity, sentence_embeddings
from .inspect import Profile, inspect
from .models import load

__version__ = "0.1.0"

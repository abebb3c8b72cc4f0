"""leanformer: make pretrained transformers cheaper to adapt, store and run, and see where their capacity goes."""
from .errors import LeanformerError
from .models import load

__version__ = "0.1.0"

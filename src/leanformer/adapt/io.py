"""Save / load adapters (JSON config + safetensors, with a fingerprint of the base) and export to peft.

Layout of a saved adapter directory:
  leanformer.json      {"kind": "adapter", "base_model", "head", "num_labels", "fingerprint",
                        "adapters": {name: config}, "active": name}
  adapter.safetensors  "<name>::<layer>.<tensor>" for every adapter tensor (trained and frozen factors:
                        LoRA-XS's SVD factors are saved, not recomputed, so a load is bit-exact) and
                        "modules::<param>" for modules_to_save (e.g. the trained classifier head).
`lf.load(dir)` rebuilds the base from "base_model" and applies the adapters.
"""
from __future__ import annotations

import copy
import hashlib
import os
from pathlib import Path

import torch
from torch import nn

from ..errors import LeanformerError
from ..io import load_json, load_tensors, output_dir, save_json, save_tensors
from ..models import head_kind
from .base import (HEAD_NAMES, AdaptedLinear, active_adapter, adapt, adapted_layers, config_from_dict,
                   set_adapter, set_rank, strip_adapters)

FORMAT = 1


def _saved_module_params(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters of every adapter's modules_to_save, by their name in the unadapted model."""
    names: set[str] = set()
    for cfg in getattr(model, "leanformer_adapters", {}).values():
        names.update(cfg.modules_to_save)
    out = {}
    for n, p in model.named_parameters():
        mod = n.rsplit(".", 1)[0]
        if any(f".{s}." in f".{mod}." for s in names):  # inside a module named by a modules_to_save suffix
            out[_base_name(n)] = p
    return out


def _base_name(n: str) -> str:
    return n.replace(".base_layer.", ".")


def fingerprint(model: nn.Module, adapted: list[str] | None = None) -> str:
    """sha256 over the base weights (names, dtypes and bytes), adapters and trained heads excluded.

    The weights of adapted layers enter by name and shape only: merging and unmerging an adapter
    changes them by fp32 rounding, and the fingerprint must not depend on whether one was merged.
    Everything else (embeddings, norms, biases, other layers) tells one checkpoint from another."""
    skip = set(_saved_module_params(model))
    names = adapted if adapted is not None else [n for n, _ in adapted_layers(model)]
    adapted_weights = {f"{n}.weight" for n in names}
    h = hashlib.sha256()
    for n, p in sorted(model.state_dict().items()):
        if ".adapters." in n or not torch.is_tensor(p):
            continue
        key = _base_name(n)
        if key in skip or key.split(".")[0] in HEAD_NAMES and key.split(".")[0] != "lm_head":
            continue  # heads are created at load time (random) and saved with the adapter
        h.update(f"{key}:{p.dtype}:{tuple(p.shape)}".encode())
        if key not in adapted_weights:
            h.update(p.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


def save_adapter(model: nn.Module, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write every adapter on `model` (and its modules_to_save) to the new directory `path`."""
    if not getattr(model, "leanformer_adapters", None):
        raise LeanformerError("this model has no leanformer adapters to save; call lf.adapt first")
    with output_dir(path, overwrite=overwrite) as tmp:
        write_adapter(model, tmp)
    return Path(path)


def write_adapter(model: nn.Module, directory: Path) -> None:
    """The files of a saved adapter, written (atomically, each) into an existing directory."""
    registry = getattr(model, "leanformer_adapters", None)
    if not registry:
        raise LeanformerError("this model has no leanformer adapters to save; call lf.adapt first")
    tensors: dict[str, torch.Tensor] = {}
    for layer_name, layer in adapted_layers(model):
        for name, adapter in layer.adapters.items():
            for k, v in adapter.state_dict().items():
                tensors[f"{name}::{layer_name}.{k}"] = v
    for n, p in _saved_module_params(model).items():
        tensors[f"modules::{n}"] = p
    base = str(getattr(model, "name_or_path", "") or "")
    if base and Path(base).expanduser().is_dir():
        base = str(Path(base).expanduser().resolve())
    meta = {"kind": "adapter", "format": FORMAT, "base_model": base, "head": head_kind(model),
            "num_labels": int(getattr(model.config, "num_labels", 0) or 0) if hasattr(model, "config") else 0,
            "fingerprint": fingerprint(model), "adapted_layers": [n for n, _ in adapted_layers(model)],
            "adapters": {n: c.to_dict() for n, c in registry.items()}, "active": active_adapter(model)}
    save_tensors(Path(directory) / "adapter.safetensors", tensors)
    save_json(Path(directory) / "leanformer.json", meta)


def load_adapter(model: nn.Module, path: str | os.PathLike, check_base: bool = True) -> nn.Module:
    """Apply a saved adapter directory to `model` (in place); refuses a base with other weights."""
    path = Path(path)
    if not (path / "leanformer.json").is_file():
        raise LeanformerError(f"{path} is not a saved adapter (no leanformer.json)")
    meta = load_json(path / "leanformer.json")
    if meta.get("kind") != "adapter":
        raise LeanformerError(f"{path} holds a {meta.get('kind')!r} artifact, not an adapter")
    existing = set(getattr(model, "leanformer_adapters", {}) or {})
    clash = existing & set(meta["adapters"])
    if clash:
        raise LeanformerError(f"model already has adapter(s) {sorted(clash)}; load onto a fresh base")
    if check_base and not existing:
        fp = fingerprint(model, meta.get("adapted_layers", []))
        if fp != meta["fingerprint"]:
            raise LeanformerError(
                f"{path} was trained on a different base model ({meta.get('base_model') or 'unknown'}, weights "
                f"fingerprint {meta['fingerprint'][:12]}…); this model's weights give {fp[:12]}…. Load the adapter "
                "onto the base it was trained on (same checkpoint and dtype)")
    tensors = load_tensors(path / "adapter.safetensors")
    for name, cfg_dict in meta["adapters"].items():
        adapt(model, config_from_dict(cfg_dict), name=name)
        for layer_name, layer in adapted_layers(model):
            if name not in layer.adapters:
                continue
            prefix = f"{name}::{layer_name}."
            state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            missing, unexpected = layer.adapters[name].load_state_dict(state, strict=False)
            if missing or unexpected:
                raise LeanformerError(f"{path}: adapter {name!r} at {layer_name} does not fit this model "
                                      f"(missing {missing}, unexpected {unexpected})")
    params = {_base_name(n): p for n, p in model.named_parameters()}
    with torch.no_grad():
        for k, v in tensors.items():
            if k.startswith("modules::"):
                n = k[len("modules::"):]
                if n not in params or params[n].shape != v.shape:
                    raise LeanformerError(f"{path}: saved module parameter {n} does not fit this model")
                params[n].copy_(v)
    set_adapter(model, meta.get("active") or next(iter(meta["adapters"])))
    return model


def load_adapter_dir(path: str | os.PathLike, device: str = "cpu"):
    """ARTIFACT_LOADERS["adapter"]: rebuild the recorded base, apply the adapter → (model, tokenizer)."""
    from ..models import load

    meta = load_json(Path(path) / "leanformer.json")
    if not meta.get("base_model"):
        raise LeanformerError(f"{path}: the adapter does not record its base model; load the base yourself "
                              "and call lf.load_adapter(model, path)")
    head = meta.get("head", "auto")
    model, tok = load(meta["base_model"], head=head,
                      num_labels=meta.get("num_labels") if head == "sequence-classification" else None, device=device)
    load_adapter(model, path)
    model.name_or_path = str(path)
    return model.eval(), tok


# ---------------------------------------------------------------------------------------------
# peft export


def _unadapted_copy(model: nn.Module) -> nn.Module:
    """A deep copy of the model with adapters removed and the base weights as they were trained on."""
    merged = [(layer, layer.merged) for _, layer in adapted_layers(model) if layer.merged]
    for layer, _ in merged:
        layer.unmerge()
    try:
        base = copy.deepcopy(model)
    finally:
        for layer, name in merged:
            layer.merge(name)
    for hook_dict in ("_forward_pre_hooks", "_forward_hooks"):
        getattr(base, hook_dict).clear()
    return strip_adapters(base)


def export_peft(model: nn.Module, path: str | os.PathLike, name: str | None = None, rank: int | None = None,
                overwrite: bool = False) -> Path:
    """Write adapter `name` (default: active) as a standard peft adapter directory.

    lora / lora_xs / dylora (at `rank`, default its current rank) → peft LoRA (exact: LoRA-XS's
    ΔW = (α/r)·(B R)·A is a rank-r LoRA); krona → peft LoKr when peft's one decompose_factor
    reproduces every layer's factor shapes, else a LeanformerError. Load it with
    `PeftModel.from_pretrained(base, path)`.
    """
    import peft

    name = name or active_adapter(model)
    registry = getattr(model, "leanformer_adapters", {}) or {}
    if name not in registry:
        raise LeanformerError(f"no adapter named {name!r} to export; adapters: {list(registry)}")
    cfg = registry[name]
    layers = [(n, layer.adapters[name]) for n, layer in adapted_layers(model) if name in layer.adapters]
    saved_modules = list(cfg.modules_to_save)
    if cfg.method == "dylora" and rank is not None:
        previous = layers[0][1].eval_rank
        set_rank(model, rank, name)
        try:
            return export_peft(model, path, name, None, overwrite)
        finally:
            set_rank(model, previous, name)
    elif rank is not None:
        raise LeanformerError(f"rank= applies to dylora exports only; {name!r} is {cfg.method}")

    if cfg.method == "krona" and cfg.variant != "linear":
        raise LeanformerError(f"krona variant {cfg.variant!r} spans a whole feed-forward block; peft has no "
                              "equivalent (only variant='linear' exports to LoKr)")
    base = _unadapted_copy(model)  # carries the trained modules_to_save values into peft's copies
    targets = [n for n, _ in layers]
    if cfg.method in ("lora", "lora_xs", "dylora"):
        r = layers[0][1].lora_factors()[2]
        pcfg = peft.LoraConfig(r=r, lora_alpha=cfg.alpha, target_modules=targets, lora_dropout=cfg.dropout,
                               modules_to_save=saved_modules or None, init_lora_weights=False)
        pmodel = peft.get_peft_model(base, pcfg)
        with torch.no_grad():
            for n, adapter in layers:
                a, b, _ = adapter.lora_factors()
                layer = pmodel.base_model.model.get_submodule(n)
                layer.lora_A["default"].weight.copy_(a)
                layer.lora_B["default"].weight.copy_(b)
    elif cfg.method == "krona":
        shapes = [(n, tuple(a.kron_A.shape), tuple(a.kron_B.shape)) for n, a in layers]
        factor = _lokr_factor(shapes)
        r = max(max(bs) for _, _, bs in shapes)  # r ≥ max(b1, b2)/2 makes LoKr keep w2 full (not low-rank)
        pcfg = peft.LoKrConfig(r=r, alpha=cfg.alpha * r, target_modules=targets, decompose_both=False,
                               decompose_factor=factor, modules_to_save=saved_modules or None)
        pmodel = peft.get_peft_model(base, pcfg)
        with torch.no_grad():
            for n, adapter in layers:
                layer = pmodel.base_model.model.get_submodule(n)
                layer.lokr_w1["default"].copy_(adapter.kron_A)
                layer.lokr_w2["default"].copy_(adapter.kron_B)
    else:
        raise LeanformerError(f"no peft export for method {cfg.method!r}")
    with output_dir(path, overwrite=overwrite) as tmp:
        pmodel.save_pretrained(str(tmp), safe_serialization=True)
    return Path(path)


def _lokr_factor(shapes) -> int:
    """peft LoKr splits out and in with one `decompose_factor`; find one that gives our shapes."""
    from peft.tuners.lokr.layer import factorization

    candidates = [-1] + sorted({v for _, a, b in shapes for v in (*a, *b)})
    for f in candidates:
        if all(factorization(a[0] * b[0], f) == (a[0], b[0]) and factorization(a[1] * b[1], f) == (a[1], b[1])
               for _, a, b in shapes):
            return f
    n, a, b = shapes[0]
    raise LeanformerError(
        f"krona factor shapes (e.g. {n}: A {a} ⊗ B {b}) cannot be expressed as peft LoKr, which splits "
        "out and in with one decompose_factor as (f, dim/f) or near-square; retrain with the default "
        "near-square shapes or a_shape=(f, f)")

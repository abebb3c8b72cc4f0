"""Export an adapter as a standard peft adapter directory (`PeftModel.from_pretrained` loads it).
A different format from `lf.save`, so a different verb."""
from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from torch import nn

from ..errors import LeanformerError
from ..files import output_dir
from ..targets import is_transposed
from .base import active_adapter, adapted_layers, adapter_configs, set_rank, strip_adapters


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
    import peft  # imported here: it adds seconds to `import leanformer` and only export needs it

    name = name or active_adapter(model)
    registry = adapter_configs(model)
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
    targets = [n for n, _ in layers]
    transposed = [n for n in targets if is_transposed(model.get_submodule(n))]
    if cfg.method == "krona" and transposed:  # peft 0.21's LoKr accepts nn.Linear / Conv1d / Conv2d only
        raise LeanformerError(f"krona on transformers' Conv1D layers ({transposed[0]}, …) cannot be exported: peft's "
                              "LoKr does not wrap Conv1D; lf.save keeps the adapter, or train lora / lora_xs / dylora, "
                              "which export to peft exactly")
    base = _unadapted_copy(model)  # carries the trained modules_to_save values into peft's copies
    if cfg.method in ("lora", "lora_xs", "dylora"):
        r = layers[0][1].lora_factors()[2]
        # Conv1D (GPT-2) stores W as (in, out): peft's fan_in_fan_out; the LoRA factors are the same
        pcfg = peft.LoraConfig(r=r, lora_alpha=cfg.alpha, target_modules=targets, lora_dropout=cfg.dropout,
                               modules_to_save=saved_modules or None, init_lora_weights=False,
                               fan_in_fan_out=bool(transposed))
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
    # peft records model.name_or_path as the base; an alias ("minilm") is no path peft can fetch
    pmodel.peft_config["default"].base_model_name_or_path = _resolvable_base(model)
    with output_dir(path, overwrite=overwrite) as tmp:
        pmodel.save_pretrained(str(tmp), safe_serialization=True)
    return Path(path)


def _resolvable_base(model: nn.Module) -> str | None:
    """The base as `PeftModel.from_pretrained` / `AutoPeftModel` can find it: an alias becomes its
    local directory; a directory or hub id stays as it is."""
    from ..models import resolve
    from ..stack import base_of

    name = str(base_of(model).get("name_or_path") or getattr(model, "name_or_path", "") or "")
    if not name:
        return None
    try:
        return resolve(name)
    except LeanformerError:
        return name


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

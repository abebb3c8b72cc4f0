"""Save / load quantized models: safetensors with the packed indices as stored, plus JSON headers.

Layout of a saved directory:
  leanformer.json     {"kind": "quantized", "format", "model_class", "base_model", "quant": config,
                       "skipped": {layer: why}, "layers": {layer: header + {"tensors": {name: [dtype, shape]}}},
                       "tied": {dropped key: kept key}}
  config.json         the Hugging Face model config (architecture)
  model.safetensors   the model's state dict: quantized layers as <layer>.packed / .codebook / .scale …
  size.json           size_report(model): honest bits per weight per layer and in total
  tokenizer files
`lf.load(dir)` (models.ARTIFACT_LOADERS["quantized"]) rebuilds the architecture from config.json,
puts QuantizedLinear layers where the header says, and loads the tensors: outputs are bit-identical.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..errors import LeanformerError
from ..files import load_json, load_tensors, output_dir, save_json, save_tensors
from .base import QuantizedLinear, _set_module, method_module, packed_nbytes
from .size import size_report

FORMAT = 1
WEIGHTS = "model.safetensors"


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


def save_quantized(model: nn.Module, tokenizer, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write a quantized model (after `quantize`) to `path` atomically."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    if not layers:
        raise LeanformerError(f"{type(model).__name__} has no quantized layers; call lf.quantize(model, config) first")
    info = getattr(model, "leanformer_quant", {})
    state, tied = _dedup_state(model)
    header = {
        "kind": "quantized", "format": FORMAT, "model_class": type(model).__name__,
        "base_model": getattr(model, "leanformer_base_model", None) or getattr(model, "name_or_path", None),
        "quant": info.get("config"), "skipped": info.get("skipped", {}), "tied": tied,
        "layers": {n: {**m.header, "tensors": {k: [str(v.dtype).removeprefix("torch."), list(v.shape)]
                                               for k, v in m.stored_tensors().items()}}
                   for n, m in layers.items()},
    }
    with output_dir(path, overwrite=overwrite) as staging:
        model.config.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        save_tensors(staging / WEIGHTS, state, metadata={"format": "pt"})
        save_json(staging / "size.json", size_report(model).to_json())
        save_json(staging / "leanformer.json", header)
    return Path(path)


def _model_class(name: str):
    import transformers

    cls = getattr(transformers, name, None)
    if cls is None or not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise LeanformerError(f"saved model_class {name!r} is not a transformers model class")
    return cls


def _check_layer(path: Path, name: str, h: dict, tensors: dict[str, torch.Tensor]) -> None:
    """The header and the tensors on disk must agree, packed sizes above all."""
    for k, (dtype, shape) in h["tensors"].items():
        key = f"{name}.{k}"
        if key not in tensors:
            raise LeanformerError(f"{path / WEIGHTS}: quantized layer {name} lacks tensor {k!r} named in its header")
        t = tensors[key]
        if list(t.shape) != list(shape) or str(t.dtype).removeprefix("torch.") != dtype:
            raise LeanformerError(f"{path / WEIGHTS}: {key} is {str(t.dtype).removeprefix('torch.')}{list(t.shape)} "
                                  f"but the header says {dtype}{list(shape)}")
    out_f, in_f = h["shape"]
    want = packed_nbytes(out_f * in_f, h["bits"])
    got = tensors[f"{name}.packed"].numel()
    if got != want:
        raise LeanformerError(f"{path}: layer {name} holds {got} packed bytes but its header "
                              f"({out_f}x{in_f} weights at {h['bits']} bits) needs {want}; the checkpoint is corrupt")


def load_quantized(path: str | os.PathLike, device: str = "cpu"):
    """(model, tokenizer) from a directory written by save_quantized."""
    from transformers import AutoConfig, AutoTokenizer

    path = Path(path)
    meta = load_json(path / "leanformer.json")
    if meta.get("kind") != "quantized" or meta.get("format") != FORMAT:
        raise LeanformerError(f"{path}: not a quantized-model directory of format {FORMAT} "
                              f"(kind={meta.get('kind')!r}, format={meta.get('format')!r})")
    if not (path / WEIGHTS).is_file():
        raise LeanformerError(f"{path}: {WEIGHTS} is missing")
    config = AutoConfig.from_pretrained(path)
    cls = _model_class(meta["model_class"])
    model = cls(config)
    tensors = load_tensors(path / WEIGHTS)
    for name, h in meta["layers"].items():
        method_module(h["method"])  # unknown methods fail with the list of known ones
        try:
            old = model.get_submodule(name)
        except AttributeError as e:
            raise LeanformerError(f"{path}: header names layer {name}, which {cls.__name__} does not have") from e
        _check_layer(path, name, h, tensors)
        stored = {k: tensors[f"{name}.{k}"] for k in h["tensors"]}
        header = {k: v for k, v in h.items() if k != "tensors"}
        q = QuantizedLinear(old.in_features, old.out_features, header, stored, old.bias,
                            cache=bool((meta.get("quant") or {}).get("cache", False)))
        _set_module(model, name, q)
    for dropped, kept in meta.get("tied", {}).items():
        if kept in tensors and dropped not in tensors:
            tensors[dropped] = tensors[kept]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise LeanformerError(f"{path}: weights do not match {cls.__name__}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.leanformer_quant = {"config": meta.get("quant"), "skipped": meta.get("skipped", {})}
    model.leanformer_base_model = meta.get("base_model")
    model.name_or_path = str(path)
    tokenizer = None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        pass  # saved without a tokenizer
    if tokenizer is not None and tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return model.to(device).eval(), tokenizer

"""Texts and token windows.

Text sources for `inspect`, calibration and perplexity: a built-in corpus that exists on every
machine (the English documentation prose shipped inside CPython's standard library,
`pydoc_data.topics`), plain text files, and Hugging Face datasets names. `token_chunks` turns texts
into token windows; `batches` pads them, and the attention mask is what keeps padded positions out
of every metric.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch

from .errors import LeanformerError
from .paths import hub_reachable

# --------------------------------------------------------------------------------------------
# Texts


def default_corpus() -> list[str]:
    """English prose that ships with CPython (the pydoc topic pages: ~460 k characters)."""
    from pydoc_data.topics import topics

    texts = []
    for key in sorted(topics):
        # Paragraphs, with code-ish lines (indented examples, rule lines) removed.
        for para in re.split(r"\n\s*\n", topics[key]):
            lines = [ln.strip() for ln in para.splitlines()
                     if ln.strip() and not ln.startswith("   ") and not set(ln.strip()) <= set("*=-+|")]
            text = " ".join(lines)
            if len(text) > 80:
                texts.append(text)
    return texts


def read_text_files(paths: Sequence[str | os.PathLike]) -> list[str]:
    """Paragraphs (blank-line separated) of each file, in order."""
    texts: list[str] = []
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise LeanformerError(f"text file not found: {p}")
        content = p.read_text(encoding="utf-8", errors="replace")
        texts.extend(t.strip() for t in re.split(r"\n\s*\n", content) if t.strip())
    if not texts:
        raise LeanformerError(f"no text found in {', '.join(map(str, paths))} (files are empty)")
    return texts


def split_dataset_name(name: str) -> tuple[str, str | None, str]:
    """'wikitext:wikitext-2-raw-v1@test' → (path, config, split); config and split optional."""
    split = "train"
    if "@" in name:
        name, split = name.rsplit("@", 1)
    config = None
    if ":" in name:
        name, config = name.split(":", 1)
    return name, config, split


def load_hf_dataset(name: str, split: str | None = None):
    import datasets

    path, config, default_split = split_dataset_name(name)
    if not Path(path).exists() and not hub_reachable()[0]:
        datasets.config.HF_HUB_OFFLINE = True  # cached copies only; no retries against a dead network
    try:
        return datasets.load_dataset(path, config, split=split or default_split)
    except Exception as e:  # network, unknown name, missing config: one clear message
        raise LeanformerError(
            f"could not load Hugging Face dataset {name!r} ({type(e).__name__}: {str(e)[:300]}). "
            "Names look like 'path[:config][@split]'; without network access only cached or local "
            "datasets load — pass --text FILE for a local text file instead") from e


def dataset_texts(name: str) -> list[str]:
    ds = load_hf_dataset(name)
    columns = [c for c, f in ds.features.items() if getattr(f, "dtype", None) == "string"]
    if not columns:
        raise LeanformerError(f"dataset {name!r} has no text column (columns: {list(ds.features)})")
    column = "text" if "text" in columns else columns[0]
    return [t for t in ds[column] if t and t.strip()]


def get_texts(text_paths: Sequence[str] | None = None, dataset: str | None = None) -> list[str]:
    texts: list[str] = []
    if text_paths:
        texts += read_text_files(text_paths)
    if dataset:
        texts += dataset_texts(dataset)
    return texts if (text_paths or dataset) else default_corpus()


# --------------------------------------------------------------------------------------------
# Tokens and batches


def token_chunks(tokenizer, texts: Iterable[str], max_length: int, tokens: int | None = None) -> list[list[int]]:
    """Token windows of at most `max_length` (special tokens included), in text order, until
    `tokens` tokens are collected (all of them if None). Windows never cross text boundaries."""
    if tokens is not None and tokens <= 0:
        raise LeanformerError(f"--tokens must be positive, got {tokens}")
    if max_length < 4:
        raise LeanformerError(f"max_seq_length must be at least 4, got {max_length}")
    chunks: list[list[int]] = []
    total = 0
    texts = list(texts)
    for start in range(0, len(texts), 256):
        enc = tokenizer(texts[start:start + 256], truncation=True, max_length=max_length,
                        return_overflowing_tokens=True)
        for ids in enc["input_ids"]:
            if tokens is not None and total + len(ids) > tokens:
                ids = ids[: tokens - total]
            if len(ids) >= 2:
                chunks.append(list(ids))
                total += len(ids)
            if tokens is not None and total >= tokens:
                return chunks
    return chunks


def pad_batch(tokenizer, chunks: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
    width = max(len(c) for c in chunks)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(chunks), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(chunks), width), dtype=torch.long)
    for i, c in enumerate(chunks):
        ids[i, : len(c)] = torch.tensor(c)
        mask[i, : len(c)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def batches(tokenizer, chunks: Sequence[Sequence[int]], batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    if batch_size <= 0:
        raise LeanformerError(f"--batch-size must be positive, got {batch_size}")
    for i in range(0, len(chunks), batch_size):
        yield pad_batch(tokenizer, chunks[i:i + batch_size])

"""Texts and labelled tasks.

Text sources for `inspect` / perplexity: a built-in corpus that exists on every machine (the English
documentation prose shipped inside CPython's standard library, `pydoc_data.topics`), plain text
files, and Hugging Face datasets names. `token_chunks` turns texts into token windows; `batches`
pads them, and the attention mask is what keeps padded positions out of every metric.

Tasks for fine-tuning / evaluation: GLUE-format directories (SST-2, CoLA, MRPC, RTE, QNLI, STS-B
column layouts), a CSV/JSONL train+dev pair, or a Hugging Face datasets name.
"""
from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch

from .errors import LeanformerError

# --------------------------------------------------------------------------------------------
# Shared data location


def data_root(required: bool = False) -> Path | None:
    """$LEANFORMER_DATA, else ../shared/data beside the project checkout or the working directory."""
    candidates = []
    if os.environ.get("LEANFORMER_DATA"):
        candidates.append(Path(os.environ["LEANFORMER_DATA"]))
    candidates.append(Path(__file__).resolve().parents[3] / "shared" / "data")
    candidates.append(Path.cwd().parent / "shared" / "data")
    for c in candidates:
        if c.is_dir():
            return c
    if required:
        raise LeanformerError(
            "shared data not found: set LEANFORMER_DATA or place it at ../shared/data "
            f"(looked in {', '.join(str(c) for c in candidates)})")
    return None


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


def _split_dataset_name(name: str) -> tuple[str, str | None, str]:
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

    from .models import _hub_reachable

    path, config, default_split = _split_dataset_name(name)
    if not Path(path).exists() and not _hub_reachable()[0]:
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
        raise LeanformerError(f"--max-length must be at least 4, got {max_length}")
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


# --------------------------------------------------------------------------------------------
# Labelled tasks


@dataclass
class Split:
    text_a: list[str]
    text_b: list[str] | None
    labels: list  # int class ids, or floats for regression

    def __len__(self) -> int:
        return len(self.text_a)


@dataclass
class Task:
    name: str
    train: Split
    dev: Split
    label_names: list[str] = field(default_factory=list)  # empty for regression
    metrics: tuple[str, ...] = ("accuracy",)

    @property
    def is_regression(self) -> bool:
        return not self.label_names

    @property
    def num_labels(self) -> int:
        return 1 if self.is_regression else len(self.label_names)


# Column layouts of the GLUE TSV files: (header-detect columns, text_a, text_b, label, labels, metrics)
_GLUE = {
    "SST-2": dict(a="sentence", b=None, label="label", names=["0", "1"], metrics=("accuracy",)),
    "CoLA": dict(a=3, b=None, label=1, names=["0", "1"], metrics=("mcc", "accuracy"), header=False),
    "MRPC": dict(a="#1 String", b="#2 String", label="Quality", names=["0", "1"], metrics=("accuracy", "f1")),
    "RTE": dict(a="sentence1", b="sentence2", label="label", names=["entailment", "not_entailment"],
                metrics=("accuracy",)),
    "QNLI": dict(a="question", b="sentence", label="label", names=["entailment", "not_entailment"],
                 metrics=("accuracy",)),
    "STS-B": dict(a="sentence1", b="sentence2", label="score", names=[], metrics=("pearson", "spearman")),
}


def _read_tsv(path: Path) -> list[list[str]]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        return [row for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]


def _glue_layout(directory: Path, header: list[str]) -> str | None:
    name = directory.name.upper().replace("_", "-")
    for key in _GLUE:
        if key.upper() == name or key.upper().replace("-", "") == name.replace("-", ""):
            return key
    for key, spec in _GLUE.items():  # fall back to the header's columns
        if spec.get("header", True) and isinstance(spec["a"], str) and spec["a"] in header \
                and spec["label"] in header and (spec["b"] is None or spec["b"] in header):
            return key
    return None


def _glue_split(path: Path, key: str, labels_known: list[str]) -> Split:
    spec = _GLUE[key]
    rows = _read_tsv(path)
    if spec.get("header", True):
        header, rows = rows[0], rows[1:]
        missing = [c for c in (spec["a"], spec["b"], spec["label"]) if c is not None and c not in header]
        if missing:
            raise LeanformerError(f"{path}: {key} layout needs columns {missing}; found {header}")
        ia, ib, il = (header.index(c) if c is not None else None for c in (spec["a"], spec["b"], spec["label"]))
    else:
        ia, ib, il = spec["a"], spec["b"], spec["label"]
    rows = [r for r in rows if len(r) > max(i for i in (ia, ib, il) if i is not None)]
    a = [r[ia] for r in rows]
    b = [r[ib] for r in rows] if ib is not None else None
    raw = [r[il] for r in rows]
    return Split(a, b, _encode_labels(raw, labels_known, path))


def _encode_labels(raw: list, label_names: list[str], where) -> list:
    if not label_names:  # regression
        try:
            return [float(x) for x in raw]
        except ValueError as e:
            raise LeanformerError(f"{where}: regression labels must be numbers ({e})") from e
    index = {n: i for i, n in enumerate(label_names)}
    bad = sorted({str(x) for x in raw if str(x) not in index})
    if bad:
        raise LeanformerError(f"{where}: labels {bad[:10]} are outside the label set {label_names}")
    return [index[str(x)] for x in raw]


def _read_records(path: Path) -> list[dict]:
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    with open(path, encoding="utf-8-sig", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ","))


_TEXT_COLUMNS = [("sentence1", "sentence2"), ("question", "sentence"), ("premise", "hypothesis"),
                 ("sentence", None), ("text", None)]


def _records_task(name: str, train: list[dict], dev: list[dict], where: str) -> Task:
    cols = list(train[0]) if train else []
    pair = next(((a, b) for a, b in _TEXT_COLUMNS if a in cols and (b is None or b in cols)), None)
    label_col = next((c for c in ("label", "score", "labels") if c in cols), None)
    if pair is None or label_col is None:
        raise LeanformerError(
            f"unknown task layout in {where}: found columns {cols}; expected a text column "
            "(sentence / text, or a pair sentence1+sentence2, question+sentence, premise+hypothesis) "
            "and a label column (label, or score for regression)")
    raw_train = [r[label_col] for r in train]
    is_float = any(isinstance(x, float) or (isinstance(x, str) and re.fullmatch(r"-?\d*\.\d+", x.strip()))
                   for x in raw_train)
    names = [] if is_float else sorted({str(x) for x in raw_train}, key=lambda s: (len(s), s))
    a, b = pair

    def split(rows, w):
        return Split([str(r[a]) for r in rows], [str(r[b]) for r in rows] if b else None,
                     _encode_labels([r[label_col] if is_float else str(r[label_col]) for r in rows], names, w))

    metrics = ("pearson", "spearman") if is_float else (("accuracy", "f1") if len(names) == 2 else ("accuracy",))
    return Task(name, split(train, f"{where} (train)"), split(dev, f"{where} (dev)"), names, metrics)


def load_task(spec: str) -> Task:
    """A GLUE-format directory, 'TRAIN,DEV' CSV/JSONL files, a directory holding train/dev files of
    those formats, or a Hugging Face datasets name ('glue:sst2')."""
    if "," in spec:
        train_path, dev_path = (Path(p) for p in spec.split(",", 1))
        for p in (train_path, dev_path):
            if not p.is_file():
                raise LeanformerError(f"task file not found: {p}")
        return _records_task(train_path.stem, _read_records(train_path), _read_records(dev_path), spec)
    path = Path(spec)
    if path.is_dir():
        for ext in (".tsv", ".csv", ".jsonl"):
            train = path / f"train{ext}"
            dev = next((path / f"{d}{ext}" for d in ("dev", "validation", "valid") if (path / f"{d}{ext}").is_file()), None)
            if train.is_file() and dev is not None:
                break
        else:
            raise LeanformerError(f"{path} has no train/dev pair (looked for train.tsv + dev.tsv, .csv or .jsonl); "
                                  f"found {sorted(p.name for p in path.iterdir())[:20]}")
        if ext == ".tsv":
            header = _read_tsv(train)[0] if train.stat().st_size else []
            key = _glue_layout(path, header)
            if key is not None:
                spec_ = _GLUE[key]
                return Task(key, _glue_split(train, key, spec_["names"]), _glue_split(dev, key, spec_["names"]),
                            list(spec_["names"]), spec_["metrics"])
        return _records_task(path.name, _read_records(train), _read_records(dev), str(path))
    if path.exists() or spec.startswith((".", "/", "~")):
        raise LeanformerError(f"task path {spec!r} is not a directory or a 'TRAIN,DEV' file pair")
    ds_train = load_hf_dataset(spec, split="train")
    dev_split = next((s for s in ("validation", "dev", "test") if _has_split(spec, s)), None)
    if dev_split is None:
        raise LeanformerError(f"dataset {spec!r} has no validation/dev/test split")
    ds_dev = load_hf_dataset(spec, split=dev_split)
    task = _records_task(spec, list(ds_train), list(ds_dev), spec)
    names = getattr(ds_train.features.get("label"), "names", None)
    if names and not task.is_regression:  # keep the dataset's own label order and names
        task.label_names = list(names)
    return task


def _has_split(spec: str, split: str) -> bool:
    import datasets

    path, config, _ = _split_dataset_name(spec)
    try:
        return split in datasets.get_dataset_split_names(path, config)
    except Exception:
        return False

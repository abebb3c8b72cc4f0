"""Labelled tasks for fine-tuning and evaluation: GLUE-format directories (SST-2, CoLA, MRPC, RTE,
QNLI, STS-B column layouts), a CSV/JSONL train+dev pair, or a Hugging Face datasets name."""
from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import LeanformerError
from .text import load_hf_dataset, split_dataset_name, token_chunks


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
    layout: str = ""  # how the files were read (which GLUE layout / which columns), for the user to check

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


def _layout_fits(key: str, header: list[str]) -> bool:
    """Every column layout `key` reads is present (CoLA, headerless: four fields, a 0/1 label second)."""
    spec = _GLUE[key]
    if not spec.get("header", True):
        return len(header) == 4 and header[1] in ("0", "1")
    return all(c in header for c in (spec["a"], spec["b"], spec["label"]) if c is not None)


def _specificity(key: str) -> int:
    return sum(c is not None for c in (_GLUE[key]["a"], _GLUE[key]["b"], _GLUE[key]["label"]))


def _glue_layout(directory: Path, header: list[str]) -> tuple[str | None, str]:
    """(layout, why) for a GLUE-format directory whose train.tsv starts with `header`.

    A layout counts only when all its columns are present. The directory's name decides among
    those (a "QNLI" directory reads as QNLI); otherwise the most specific fitting layout wins —
    pair layouts (two text columns + label) before single-sentence ones — so a QNLI-format
    directory under another name is not read as SST-2 because it also has `sentence` and `label`."""
    fitting = sorted((k for k in _GLUE if _layout_fits(k, header)), key=_specificity, reverse=True)
    name = directory.name.upper().replace("_", "-").replace("-", "")
    named = next((k for k in _GLUE if k.upper().replace("-", "") == name), None)
    if named in fitting:
        return named, f"{named} (directory name; columns present)"
    if not fitting:
        return None, ""
    tied = [k for k in fitting if _specificity(k) == _specificity(fitting[0])]
    if len(tied) > 1:
        raise LeanformerError(f"{directory}: the columns {header} fit GLUE layouts {tied} equally; name the "
                              f"directory after one of them (e.g. {directory.parent / tied[0]})")
    chosen = fitting[0]
    spec = _GLUE[chosen]
    cols = ", ".join(str(c) for c in (spec["a"], spec["b"], spec["label"]) if c is not None)
    why = f"{chosen} (columns {cols}" + (f"; directory name {directory.name!r} matches no layout)" if named is None
                                         else f"; directory name says {named}, whose columns are missing)")
    return chosen, why


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
    layout = f"columns {a}" + (f" + {b}" if b else "") + f" → {label_col}" + (" (regression)" if is_float else "")
    return Task(name, split(train, f"{where} (train)"), split(dev, f"{where} (dev)"), names, metrics, layout=layout)


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
            key, why = _glue_layout(path, header)
            if key is not None:
                spec_ = _GLUE[key]
                return Task(key, _glue_split(train, key, spec_["names"]), _glue_split(dev, key, spec_["names"]),
                            list(spec_["names"]), spec_["metrics"], layout=f"GLUE {why}")
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

    path, config, _ = split_dataset_name(spec)
    try:
        return split in datasets.get_dataset_split_names(path, config)
    except Exception:
        return False


def calibration_chunks(tokenizer, calibration, max_length: int, tokens: int, purpose: str) -> list[list[int]]:
    """Token id sequences (about `tokens` in all, each at most `max_length`) from calibration texts,
    (text_a, text_b) pairs or a Task (its train split); `purpose` names the caller in the error."""
    if isinstance(calibration, Task):
        a, b = calibration.train.text_a, calibration.train.text_b
        calibration = list(zip(a, b)) if b is not None else list(a)
    calibration = list(calibration or [])
    if not calibration:
        raise LeanformerError(f"{purpose} needs calibration text: calibration=[texts] (or a Task; CLI --text PATH "
                              "or --task T)")
    if isinstance(calibration[0], str):
        return token_chunks(tokenizer, calibration, max_length, tokens)
    chunks, total = [], 0
    for a, b in calibration:
        ids = tokenizer(a, b, truncation=True, max_length=max_length)["input_ids"]
        chunks.append(ids)
        total += len(ids)
        if total >= tokens:
            break
    return chunks

"""Atomic writes: every file and output directory appears whole or not at all.

Files are written to a temporary sibling and renamed; an output directory is built in a hidden
staging directory next to it and renamed into place when the job finishes, so a failed run never
leaves half a result and never mixes new files with an old run's.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load_file, save_file

from .errors import LeanformerError


class OutputDirError(LeanformerError):
    """The requested output directory cannot be used."""


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def save_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def load_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                 metadata: dict[str, str] | None = None) -> None:
    """safetensors file written atomically (tensors made contiguous and detached)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    return load_file(str(path))


@contextlib.contextmanager
def output_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a staging directory that becomes `path` when the block exits without error.

    An existing non-empty `path` is an error unless `overwrite`, in which case it is replaced
    whole (never merged with old files). Unwritable locations fail before any work starts.
    """
    final = Path(path).absolute()
    if final.exists() and not final.is_dir():
        raise OutputDirError(f"--out {final} exists and is not a directory")
    if final.is_dir() and any(final.iterdir()) and not overwrite:
        raise OutputDirError(
            f"--out {final} already exists and is not empty; choose a new directory or pass "
            "--overwrite to replace it (old files are never mixed with new ones)")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.partial-"))
    except OSError as e:
        raise OutputDirError(f"cannot write to --out {final}: {e.strerror or e}") from e
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if final.exists():
        trash = final.parent / f".{final.name}.old-{os.getpid()}"
        os.replace(final, trash)
        os.replace(staging, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(staging, final)

"""Where things live: the shared data directory, leanformer's cache, and whether the Hugging Face Hub
can be reached. A leaf module: it imports nothing else from leanformer but the error type."""
from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from huggingface_hub import constants as hub_constants

from .errors import LeanformerError


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


def cache_root() -> Path:
    """$LEANFORMER_CACHE, else ~/.cache/leanformer (converted checkpoints live here, never in the repo)."""
    return Path(os.environ.get("LEANFORMER_CACHE") or Path.home() / ".cache" / "leanformer").expanduser()


def hub_reachable(timeout: float = 3.0) -> tuple[bool, str]:
    """(True, "") when the Hub host accepts a TCP connection; else (False, why). Probing first turns
    a minute of library retries against a closed network into a few seconds and one clear message."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False, "HF_HUB_OFFLINE is set"
    host = urlparse(hub_constants.ENDPOINT).hostname or ""
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True, ""
    except OSError as e:
        return False, f"cannot reach {host} ({e.strerror or e})"

"""One benchmark configuration per subprocess, each with one thread (torch, OMP, OpenBLAS, MKL),
several at a time: the runner adapters_bench.py and memory_bench.py share. A configuration whose
result file exists is not run again, so an interrupted benchmark continues where it stopped."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ONE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
              "TOKENIZERS_PARALLELISM": "false"}


class ChildFailed(RuntimeError):
    """A configuration's subprocess exited with an error (the message ends with its stderr)."""


def run_child(script: str, args: list[str], out: Path) -> tuple[dict, bool]:
    """(result, ran): the JSON `script args` writes to `out`, running it only when `out` does not exist yet."""
    if out.is_file():
        return json.loads(out.read_text()), False
    proc = subprocess.run([sys.executable, script, *args], env=dict(os.environ, **ONE_THREAD), capture_output=True,
                          text=True)
    if proc.returncode:
        raise ChildFailed(proc.stderr[-3000:])
    return json.loads(out.read_text()), True

"""The commit a benchmark's figures were measured at, recorded beside them in results/."""
from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def git_state(*also_ignored: str) -> dict:
    """HEAD, and whether the code differs from it: results/ (what benchmarks write) and any
    `also_ignored` paths (e.g. a generated README section) do not count."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    excluded = [f":!{p}" for p in ("results", *also_ignored)]
    status = subprocess.run(["git", "status", "--porcelain", "--", ".", *excluded], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    return {"commit": head, "dirty": bool(status)}


def commit_label() -> str:
    """HEAD as one string, marked when the code differs from it."""
    state = git_state()
    return state["commit"] + ("+uncommitted changes" if state["dirty"] else "")

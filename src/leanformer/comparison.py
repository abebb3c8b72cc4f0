"""compare(): several inspect profiles side by side — the base model against its adapted, quantized or
pruned versions, or any models on the same text.

A run is either an inspect output directory (its metrics.json is read as is) or a model (an alias, a
Hugging Face directory, a directory written by `lf.save`, a hub id), which is inspected here with
one InspectConfig and one text for all, so every profile covers the same tokens and the same
sampled positions. A directory holding both a model and inspect's metrics.json (rare) is read as an
inspect output. The first run is the baseline of every difference.

Layers are matched by their index in the unpruned model: a pruned model records which blocks it
dropped (leanformer.json, replayed by `lf.load`; inspect stores it as info["block_origin"]), so its
block 4 is drawn and differenced at the base's block 4 even after block 0 was removed. Runs without
that record are matched by their own indices.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .configs import with_overrides
from .errors import LeanformerError
from .files import load_json
from .inspection import InspectConfig, Profile, inspect
from .metrics.schema import LAYER_METRICS, TRANSITION_METRICS, shown

# What must agree between runs for their profiles to describe the same tokens (info key → meaning).
SAME_MEASUREMENT = {"n_tokens": "token count", "text_sha256": "text", "max_length": "window length (--max-seq-length)",
                    "seed": "sample seed (--seed)", "sample_size": "TwoNN sample size (--sample-size)",
                    "id_estimator": "intrinsic-dimension estimator (--id-estimator)"}


@dataclass
class Run:
    label: str
    source: str          # the path or name given
    kind: str            # "inspect output" or "model"
    profile: Profile

    @property
    def origin(self) -> list:
        """Each block's index in the unpruned model (see inspection.block_origin)."""
        return self.profile.info.get("block_origin") or list(range(len(self.profile.transitions)))

    def layer_x(self) -> list[int]:
        """Each hidden state's position on the base model's axis: h_0 at 0, block j's output after its origin."""
        return [0] + [(max(o) if isinstance(o, list) else o) + 1 for o in self.origin]

    def block_x(self) -> list[int | None]:
        """Each block's index on the base model's axis (None for a linear map replacing several)."""
        return [None if isinstance(o, list) else o for o in self.origin]


def transforms_of(run: Run) -> str:
    """The run's applied transforms, one phrase each ("none" for an untransformed model)."""
    if "transforms" not in run.profile.info:
        return "not recorded (a profile from an older leanformer)"
    return "; ".join(run.profile.info["transforms"]) or "none"


@dataclass
class Comparison:
    runs: list[Run]
    warnings: list[str] = field(default_factory=list)

    @property
    def baseline(self) -> Run:
        return self.runs[0]

    def aligned(self, run: Run, metric) -> dict[int, float]:
        """{x on the base axis: value} of one metric of one run (undefined values left out)."""
        if metric.axis == "layer":
            xs, rows = run.layer_x(), run.profile.layers
        else:
            xs, rows = run.block_x(), run.profile.transitions
        return {x: row.get(metric.name) for x, row in zip(xs, rows) if x is not None and row.get(metric.name) is not None}

    def metrics(self) -> list:
        """The metrics with a value in any run, block metrics first (as the inspect report orders them)."""
        transitions = [t for r in self.runs for t in r.profile.transitions]
        layers = [l for r in self.runs for l in r.profile.layers]
        return list(shown(TRANSITION_METRICS, transitions)) + list(shown(LAYER_METRICS, layers))

    def differences(self, run: Run, metric) -> dict[int, float]:
        """{x: run − baseline} where both have a value."""
        base, other = self.aligned(self.baseline, metric), self.aligned(run, metric)
        return {x: other[x] - base[x] for x in sorted(other) if x in base}

    def changes(self) -> list[dict]:
        """The "what changed" table: one row per aspect, one cell per run after the baseline."""
        others = self.runs[1:]
        rows = [{"what": "transforms", "cells": [transforms_of(r) for r in others]},
                {"what": "blocks", "cells": [f"{len(self.baseline.profile.transitions)} → {len(r.profile.transitions)}"
                                             for r in others]}]
        for metric in self.metrics():
            cells = []
            for r in others:
                diff = self.differences(r, metric)
                if not diff:
                    cells.append("—")
                    continue
                x = max(diff, key=lambda k: abs(diff[k]))
                where = f"block {x}" if metric.axis == "transition" else f"h_{x}"
                mean = sum(diff.values()) / len(diff)
                cells.append(f"{diff[x]:+.4f} at {where} (mean {mean:+.4f})")
            rows.append({"what": f"{metric.label}: largest change", "cells": cells})
        base_candidates = self.baseline.profile.pruning_candidates(top=1)
        for by in base_candidates:
            cells = []
            for r in others:
                first = r.profile.pruning_candidates(top=1)[by][0]["block"]
                x = r.block_x()[first]
                was = base_candidates[by][0]["block"]
                name = f"block {x}" if x is not None else f"the linear map at position {first}"
                cells.append(f"{name} (baseline: block {was})" if x != was else f"{name} (unchanged)")
            rows.append({"what": f"prune --by {by} would remove", "cells": cells})
        return rows

    def to_json(self) -> dict:
        return {"baseline": self.baseline.label, "warnings": self.warnings,
                "runs": [{"label": r.label, "source": r.source, "kind": r.kind, "layer_x": r.layer_x(),
                          "block_x": r.block_x(), "profile": r.profile.to_json()} for r in self.runs],
                "differences": {r.label: {m.name: {str(x): d for x, d in self.differences(r, m).items()}
                                          for m in self.metrics()} for r in self.runs[1:]},
                "what_changed": self.changes()}


def compare(runs: Sequence[str | Path | Profile], texts: Sequence[str] | None = None,
            config: InspectConfig | None = None, *, labels: Sequence[str] | None = None, force: bool = False,
            device: str = "cpu", progress: bool = True, **overrides) -> Comparison:
    """Profiles of `runs` side by side (see the module docstring); the first run is the baseline.

    Runs that are models are inspected on `texts` (default: the built-in corpus) with `config`
    (keyword overrides as for inspect). Runs whose profiles cover different text or token counts,
    windows, sample or estimator are an error naming each difference, unless `force`; then each
    difference is kept as a warning of the comparison."""
    if len(runs) < 2:
        raise LeanformerError(f"compare needs at least two runs, got {len(runs)}"
                              + (f" ({runs[0]})" if runs else "") + "; to profile one model use `leanformer inspect`")
    if labels is not None and len(labels) != len(runs):
        raise LeanformerError(f"got {len(labels)} labels for {len(runs)} runs; give one label per run")
    kinds = [_kind(r) for r in runs]
    if "model" in kinds:
        config = with_overrides(InspectConfig, config, overrides, renamed={"max_length": "max_seq_length"})
        if texts is None:
            from .text import default_corpus

            texts = default_corpus()
    names = list(labels) if labels is not None else _labels(runs)
    loaded = []
    for run, kind, label in zip(runs, kinds, names):
        if isinstance(run, Profile):
            profile = run
        elif kind == "inspect output":
            profile = Profile.from_json(load_json(Path(run) / "metrics.json"))
        else:
            from .saving import load  # saving imports every pillar: only when a model is given

            model, tokenizer = load(run, device=device)
            profile = inspect(model, tokenizer, texts, config, progress=progress)
            del model
        loaded.append(Run(label, str(run) if not isinstance(run, Profile) else profile.model, kind, profile))
    problems = _mismatches(loaded)
    if problems and not force:
        raise LeanformerError("the runs did not measure the same tokens, so their profiles are not comparable:\n  "
                              + "\n  ".join(problems) + "\nre-run inspect with the same --text, --tokens, "
                              "--max-seq-length, --seed, --sample-size and --id-estimator (or pass the models "
                              "themselves to compare), or pass --force (force=True) to compare anyway")
    warnings = [f"compared despite: {p}" for p in problems]
    tokenizers = {r.profile.info.get("tokens_sha256") for r in loaded} - {None}
    if len(tokenizers) > 1 and not any(p.startswith("text") for p in problems):
        warnings.append("same text, but different token ids (different tokenizers): the sampled positions are "
                        "different tokens in different runs")
    return Comparison(loaded, warnings)


def _kind(run) -> str:
    """"inspect output" or "model"; a directory that is neither is an error here, before any loading."""
    if isinstance(run, Profile):
        return "inspect output"
    path = Path(run).expanduser()
    is_model = (path / "config.json").is_file() or (path / "leanformer.json").is_file()
    if (path / "metrics.json").is_file():
        metrics = load_json(path / "metrics.json")
        if isinstance(metrics, dict) and "layers" in metrics and "transitions" in metrics:
            return "inspect output"
        if not is_model:
            raise LeanformerError(
                f"{path}/metrics.json is not an inspect profile (it has no 'layers' and 'transitions'; keys: "
                f"{', '.join(list(metrics)[:8]) if isinstance(metrics, dict) else type(metrics).__name__}): compare "
                "takes inspect output directories (leanformer inspect --out DIR) or models")
    if path.is_dir() and not is_model:
        contents = sorted(p.name for p in path.iterdir())[:8]
        raise LeanformerError(
            f"{path} is neither an inspect output directory (no metrics.json) nor a model directory (no config.json "
            f"or leanformer.json); it holds {', '.join(contents) or 'nothing'}")
    return "model"  # an alias, hub id or model directory: lf.load names what is wrong with it


def _labels(runs) -> list[str]:
    names = []
    for run in runs:
        name = run.model if isinstance(run, Profile) else Path(str(run)).name or str(run)
        name = Path(name).name or name
        names.append(name if name not in names else f"{name}-{sum(n.startswith(name) for n in names) + 1}")
    return names


def _mismatches(runs: list[Run]) -> list[str]:
    """One line per way a run's measurement differs from the baseline's."""
    base = runs[0]
    problems = []
    for key, meaning in SAME_MEASUREMENT.items():
        def value(r):
            return r.profile.n_tokens if key == "n_tokens" else r.profile.info.get(key)
        for r in runs[1:]:
            a, b = value(base), value(r)
            if a is None or b is None:
                missing = [x.label for x, v in ((base, a), (r, b)) if v is None]
                problems.append(f"{meaning}: not recorded in {', '.join(missing)} (a profile from an older leanformer;"
                                " re-run inspect)")
            elif a != b:
                shown_a, shown_b = (str(a)[:12], str(b)[:12]) if key == "text_sha256" else (a, b)
                problems.append(f"{meaning}: {base.label} {shown_a} ≠ {r.label} {shown_b}")
    return list(dict.fromkeys(problems))

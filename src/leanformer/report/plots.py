"""One PNG per metric against depth; titles and the metric list from metrics.schema."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..metrics.schema import LAYER_METRICS, TRANSITION_METRICS  # noqa: E402


def plot_profile(profile, out_dir: str | Path) -> list[Path]:
    """Write <metric>.png for each metric with values (block metrics first); return the paths in
    display order."""
    out_dir = Path(out_dir)
    series = [(m, "block", [t["from"] for t in profile.transitions], [t[m.name] for t in profile.transitions])
              for m in TRANSITION_METRICS]
    series += [(m, "layer", [l["index"] for l in profile.layers], [l.get(m.name) for l in profile.layers])
               for m in LAYER_METRICS]
    paths = []
    for metric, axis, xs, ys in series:
        points = [(x, y) for x, y in zip(xs, ys) if y is not None]
        if not points:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.4), dpi=110)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", color="#3465a4")
        ax.set_title(metric.title, fontsize=10)
        ax.set_xlabel(f"{axis} index" + (" (i → i+1)" if axis == "block" else ""))
        ax.set_xticks(sorted({p[0] for p in points}))
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out_dir / f"{metric.name}.png"
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


COLORS = ("#3465a4", "#cc0000", "#4e9a06", "#f57900", "#75507b", "#c4a000", "#06989a", "#555753")


def _with_gaps(values: dict[int, float]) -> tuple[list, list]:
    """x and y with a break (NaN) wherever x skips an index, e.g. at a pruned block."""
    xs, ys = [], []
    for x in sorted(values):
        if xs and x - xs[-1] > 1:
            xs.append(x - 1)
            ys.append(float("nan"))
        xs.append(x)
        ys.append(values[x])
    return xs, ys


def plot_comparison(comparison, out_dir: str | Path) -> list[Path]:
    """Write <metric>.png per metric with values: every run's profile overlaid on the base model's
    layer axis (top) and its difference from the baseline (bottom); return the paths in display order."""
    out_dir = Path(out_dir)
    base = comparison.baseline
    paths = []
    for metric in comparison.metrics():
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(6.4, 4.8), dpi=110, sharex=True,
                                          gridspec_kw={"height_ratios": [3, 2]})
        xs = set()
        for k, run in enumerate(comparison.runs):
            color = COLORS[k % len(COLORS)]
            values = comparison.aligned(run, metric)
            xs |= set(values)
            top.plot(*_with_gaps(values), marker="o", ms=4, color=color, label=run.label,
                     linestyle="-" if k == 0 else "--")
            if k:
                bottom.plot(*_with_gaps(comparison.differences(run, metric)), marker="o", ms=4, color=color)
        bottom.axhline(0, color="#888", lw=0.8)
        top.set_title(metric.title, fontsize=10)
        top.legend(fontsize=7, loc="best")
        bottom.set_ylabel(f"− {base.label}"[:28], fontsize=8)
        bottom.set_xlabel(("block index (i → i+1)" if metric.axis == "transition" else "layer index")
                          + ", numbered as in the unpruned model", fontsize=8)
        bottom.set_xticks(sorted(xs))
        for ax in (top, bottom):
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=8)
        fig.tight_layout()
        path = out_dir / f"{metric.name}.png"
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths

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
    series += [(m, "layer", [l["index"] for l in profile.layers], [l[m.name] for l in profile.layers])
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

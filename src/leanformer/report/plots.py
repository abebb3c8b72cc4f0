"""One PNG per metric against depth."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

TITLES = {
    "linearity": "Linearity of block i (h_i → h_i+1)",
    "linearity_wo_residual": "Linearity without residual (h_i → h_i+1 − h_i)",
    "block_influence": "Block influence (1 − mean cos(h_i, h_i+1))",
    "angular_distance": "Angular distance, last token (arccos cos / π)",
    "anisotropy": "Anisotropy of h_i (σ₁² / Σσ²)",
    "intrinsic_dim": "Intrinsic dimension of h_i (TwoNN)",
    "mlp_sparsity": "MLP activation sparsity (|a| ≤ 0.01), block i−1",
}


def plot_profile(profile, out_dir: str | Path) -> list[Path]:
    """Write <metric>.png for each metric with values; return the paths in display order."""
    out_dir = Path(out_dir)
    paths = []
    from ..inspection import LAYER_METRICS, TRANSITION_METRICS

    series = [(m, "block", [t["from"] for t in profile.transitions], [t[m] for t in profile.transitions])
              for m in TRANSITION_METRICS]
    series += [(m, "layer", [l["index"] for l in profile.layers], [l[m] for l in profile.layers])
               for m in LAYER_METRICS]
    for metric, axis, xs, ys in series:
        points = [(x, y) for x, y in zip(xs, ys) if y is not None]
        if not points:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.4), dpi=110)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", color="#3465a4")
        ax.set_title(TITLES[metric], fontsize=10)
        ax.set_xlabel(f"{axis} index" + (" (i → i+1)" if axis == "block" else ""))
        ax.set_xticks(sorted({p[0] for p in points}))
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out_dir / f"{metric}.png"
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths

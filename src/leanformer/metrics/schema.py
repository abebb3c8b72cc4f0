"""The metrics of an inspection profile, each defined once: its key in metrics.json, the axis it is
measured on, its labels and its number format. The terminal table, the plots, the HTML report and the
inspect benchmark all read these definitions; the computations live in the sibling modules.

Axis "layer": a value per hidden state h_i (the rows of metrics.json "layers"); axis "transition": a
value per block h_i → h_{i+1} (the rows of "transitions").
"""
from __future__ import annotations

from dataclasses import dataclass

MLP_SPARSITY_EPS = 1e-2  # an MLP activation a with |a| ≤ this counts as (near-)zero


@dataclass(frozen=True)
class Metric:
    name: str       # key in each metrics.json row
    axis: str       # "layer" or "transition"
    label: str      # column header of the HTML report and the benchmark tables
    short: str      # column header of the terminal table; its length is the column width
    title: str      # plot title
    fmt: str        # format spec of one value
    reference: str  # where the metric is defined

    def format(self, value: float | None) -> str:
        """The value as shown; undefined values (null in metrics.json) show as a dash."""
        return "—" if value is None else format(value, self.fmt)


LAYER_METRICS = (
    Metric("anisotropy", "layer", "anisotropy", "anisotropy", "Anisotropy of h_i (σ₁² / Σσ²)", ".4f",
           "Razzhigaev et al., The Shape of Learning, EACL 2024 Findings: σ₁² / Σσᵢ² of the centred states"),
    Metric("intrinsic_dim", "layer", "intrinsic dim", "intr.dim", "Intrinsic dimension of h_i (TwoNN)", ".2f",
           "Facco et al., Sci. Rep. 2017 (TwoNN): slope of −log(1 − k/N) against log μ, μ = r₂/r₁"),
    Metric("mlp_sparsity", "layer", "MLP sparsity", "mlp_sparse",
           f"MLP activation sparsity (|a| ≤ {MLP_SPARSITY_EPS:g}), block i−1", ".3f",
           f"fraction of block i−1's MLP activations with |a| ≤ {MLP_SPARSITY_EPS:g}"),
    # Causal LMs only (null for encoders, whose columns and plots are then left out).
    Metric("logit_lens_loss", "layer", "logit-lens loss", "lens_loss", "Logit lens: next-token loss of h_i (nats)",
           ".3f", "nostalgebraist 2020, logit lens; Belrose et al. 2023 (Tuned Lens) §2: cross-entropy of "
                  "softmax(W_U · final_norm(h_i)) against the next token"),
    Metric("logit_lens_agreement", "layer", "logit-lens top-1 = final", "lens_top1",
           "Logit lens: top-1 agreement of h_i with the final layer", ".3f",
           "fraction of tokens whose top-1 token decoded from h_i equals the model's own (decoded from h_L)"),
)

TRANSITION_METRICS = (
    Metric("linearity", "transition", "linearity", "linearity", "Linearity of block i (h_i → h_i+1)", ".4f",
           "Razzhigaev et al., Your Transformer is Secretly Linear, ACL 2024: 1 − min_A ‖X̃A − Ỹ‖²"),
    Metric("linearity_wo_residual", "transition", "linearity w/o residual", "lin-resid",
           "Linearity without residual (h_i → h_i+1 − h_i)", ".4f",
           "Razzhigaev et al., ACL 2024: the linearity score of h_i → h_{i+1} − h_i"),
    Metric("block_influence", "transition", "block influence", "blk.infl",
           "Block influence (1 − mean cos(h_i, h_i+1))", ".4f",
           "Men et al., ShortGPT, 2024: 1 − mean over tokens of cos(h_i, h_{i+1})"),
    Metric("angular_distance", "transition", "angular distance", "angular",
           "Angular distance, last token (arccos cos / π)", ".4f",
           "Gromov et al., The Unreasonable Ineffectiveness of the Deeper Layers, 2024: arccos(cos) / π, last token"),
)

METRICS = {m.name: m for m in LAYER_METRICS + TRANSITION_METRICS}


def shown(metrics, rows: list[dict]) -> tuple:
    """The metrics with at least one value in `rows`: a table drops the columns that are all null
    (the logit lens of an encoder)."""
    return tuple(m for m in metrics if any(row.get(m.name) is not None for row in rows))

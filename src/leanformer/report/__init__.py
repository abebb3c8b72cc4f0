"""Plots of per-layer metrics and one self-contained HTML page (images embedded, readable offline)."""
from .html import write_comparison_report, write_report
from .plots import plot_comparison, plot_profile

__all__ = ["plot_profile", "write_report", "plot_comparison", "write_comparison_report"]

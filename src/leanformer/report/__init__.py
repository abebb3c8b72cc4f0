"""Plots of per-layer metrics and one self-contained HTML page (images embedded, readable offline)."""
from .html import write_report
from .plots import plot_profile

__all__ = ["plot_profile", "write_report"]

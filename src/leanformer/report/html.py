"""A single HTML file: summary, per-layer table and every plot embedded as base64 PNG, rendered from
the Jinja2 template report.html.j2 shipped in this package (autoescaped), so it reads offline."""
from __future__ import annotations

import base64
from pathlib import Path

import jinja2

from ..files import atomic_write_bytes
from ..metrics.schema import LAYER_METRICS, METRICS, TRANSITION_METRICS

TEMPLATE = "report.html.j2"


def _info_value(value) -> str:
    return "—" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.PackageLoader("leanformer.report", "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    env.filters["info_value"] = _info_value
    return env


def render_report(profile, plots: list[Path]) -> str:
    """The page as a string: `plots` are PNG files named <metric>.png (as plot_profile writes them)."""
    figures = []
    for p in plots:
        metric = METRICS.get(Path(p).stem)
        figures.append({"title": metric.title if metric else Path(p).stem,
                        "png_base64": base64.b64encode(Path(p).read_bytes()).decode()})
    return _environment().get_template(TEMPLATE).render(
        profile=profile, layer_metrics=LAYER_METRICS, transition_metrics=TRANSITION_METRICS, figures=figures)


def write_report(profile, plots: list[Path], path: str | Path) -> Path:
    path = Path(path)
    atomic_write_bytes(path, render_report(profile, plots).encode())
    return path

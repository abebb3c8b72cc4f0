"""A single HTML file: summary, per-layer table and every plot embedded as base64 PNG, rendered from
the Jinja2 template report.html.j2 shipped in this package (autoescaped), so it reads offline."""
from __future__ import annotations

import base64
from pathlib import Path

import jinja2

from ..files import atomic_write_bytes
from ..metrics.schema import LAYER_METRICS, METRICS, TRANSITION_METRICS, shown

TEMPLATE = "report.html.j2"


def _info_value(value) -> str:
    if isinstance(value, list):
        return "; ".join(map(str, value)) or "none"
    return "—" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.PackageLoader("leanformer.report", "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    env.filters["info_value"] = _info_value
    return env


def figures_of(plots: list[Path]) -> list[dict]:
    """{"title", "png_base64"} of PNG files named <metric>.png (titles from metrics.schema)."""
    figures = []
    for p in plots:
        metric = METRICS.get(Path(p).stem)
        figures.append({"title": metric.title if metric else Path(p).stem,
                        "png_base64": base64.b64encode(Path(p).read_bytes()).decode()})
    return figures


def render_report(profile, plots: list[Path]) -> str:
    """The page as a string: `plots` are PNG files named <metric>.png (as plot_profile writes them)."""
    from ..compress.prune import DAMAGE_SIGN, PROFILE_KEYS
    from ..inspection import ID_ESTIMATOR_USE

    criteria = [{"name": by, "metric": METRICS[PROFILE_KEYS[by]],
                 "rule": "highest first" if DAMAGE_SIGN[by] < 0 else "lowest first", "ranked": ranked}
                for by, ranked in profile.pruning_candidates().items()]
    return _environment().get_template(TEMPLATE).render(
        profile=profile, layer_metrics=shown(LAYER_METRICS, profile.layers),
        transition_metrics=shown(TRANSITION_METRICS, profile.transitions), figures=figures_of(plots),
        criteria=criteria, id_estimators=ID_ESTIMATOR_USE, id_estimator=profile.info.get("id_estimator"))


def write_report(profile, plots: list[Path], path: str | Path) -> Path:
    path = Path(path)
    atomic_write_bytes(path, render_report(profile, plots).encode())
    return path


def render_comparison(comparison, plots: list[Path]) -> str:
    """The compare page as a string: runs, warnings, the "what changed" table, overlaid plots and the
    per-layer differences."""
    metrics = comparison.metrics()
    per_metric = []
    for m in metrics:
        xs = sorted({x for r in comparison.runs for x in comparison.aligned(r, m)})
        values = [comparison.aligned(r, m) for r in comparison.runs]
        diffs = [comparison.differences(r, m) for r in comparison.runs[1:]]
        rows = [{"x": x, "values": [m.format(v.get(x)) for v in values],
                 "diffs": ["—" if x not in d else f"{d[x]:+.4f}" for d in diffs]} for x in xs]
        per_metric.append({"metric": m, "rows": rows})
    from ..comparison import transforms_of

    return _environment().get_template("compare.html.j2").render(
        comparison=comparison, transforms_of=transforms_of, figures=figures_of(plots), changes=comparison.changes(), per_metric=per_metric)


def write_comparison_report(comparison, plots: list[Path], path: str | Path) -> Path:
    path = Path(path)
    atomic_write_bytes(path, render_comparison(comparison, plots).encode())
    return path

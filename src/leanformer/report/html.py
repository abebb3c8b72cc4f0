"""A single HTML file: summary, per-layer table and every plot embedded as base64 PNG."""
from __future__ import annotations

import base64
import html
from pathlib import Path

from ..files import atomic_write_bytes
from .plots import TITLES


def _fmt(v) -> str:
    return "—" if v is None else f"{v:.4f}" if isinstance(v, float) else html.escape(str(v))


def write_report(profile, plots: list[Path], path: str | Path) -> Path:
    path = Path(path)
    rows = []
    for i, layer in enumerate(profile.layers):
        t = profile.transitions[i] if i < len(profile.transitions) else {}
        rows.append("<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in (
            i, layer["anisotropy"], layer["intrinsic_dim"], layer["mlp_sparsity"],
            f"{i}→{i + 1}" if t else "", t.get("linearity"), t.get("linearity_wo_residual"),
            t.get("block_influence"), t.get("angular_distance"))) + "</tr>")
    figures = []
    for p in plots:
        data = base64.b64encode(Path(p).read_bytes()).decode()
        title = html.escape(TITLES.get(Path(p).stem, Path(p).stem))
        figures.append(f'<figure><img alt="{title}" src="data:image/png;base64,{data}">'
                       f"<figcaption>{title}</figcaption></figure>")
    info = "".join(f"<li><b>{html.escape(k)}</b>: {_fmt(v)}</li>" for k, v in profile.info.items())
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>leanformer inspect — {html.escape(profile.model)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; font-variant-numeric: tabular-nums; }}
td, th {{ border-bottom: 1px solid #ddd; padding: 4px 10px; text-align: right; }}
.plots {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(480px, 1fr)); gap: 1em; }}
figure {{ margin: 0; }} img {{ width: 100%; }} figcaption {{ font-size: 0.85em; color: #555; }}
</style></head><body>
<h1>Layer geometry of {html.escape(profile.model)}</h1>
<p>{profile.n_tokens} tokens, hidden size {profile.hidden_size}, {len(profile.transitions)} blocks.</p>
<h2>Per layer</h2>
<table><thead><tr><th>layer</th><th>anisotropy</th><th>intrinsic dim</th><th>MLP sparsity</th><th>block</th>
<th>linearity</th><th>linearity w/o residual</th><th>block influence</th><th>angular distance</th></tr></thead>
<tbody>{''.join(rows)}</tbody></table>
<h2>Plots</h2><div class="plots">{''.join(figures)}</div>
<h2>How these were measured</h2><ul>{info}</ul>
</body></html>
"""
    atomic_write_bytes(path, page.encode())
    return path

"""Quality against cost at each τ, for any dynamic model (leanformer.dynamic's contract): what
`leanformer eval --tau / --tau-sweep` and benchmarks/dynamic_bench.py report.

Each point: the evaluation's metrics (task metrics or perplexity), the executed FLOPs per token as
fractions of the dense model's (`cost`), and the wall time of the evaluation's forward passes
(tokenization and metric code excluded), measured with hooks on the model's forward.
"""
from __future__ import annotations

import contextlib
import io
import time
from pathlib import Path
from typing import Iterator, Sequence

from torch import nn

from ..errors import LeanformerError
from ..evaluation import EvalConfig, evaluate
from . import check_tau, cost, kind_of, reset_cost, set_tau

# Default τ grid: dense end first, then ever cheaper; dense enough near 1, where routing and exit
# thresholds change the most per step.
DEFAULT_TAUS = (1.0, 0.99, 0.95, 0.9, 0.8, 0.6, 0.4, 0.2, 0.0)
LOWER_IS_BETTER = ("perplexity", "nll_per_token")


@contextlib.contextmanager
def forward_timer(*modules: nn.Module) -> Iterator[dict]:
    """{"seconds", "calls"}: wall time spent inside the forward calls of `modules` (summed) made within
    the block; a module's calls nested in another timed module's count twice, so time siblings."""
    clock = {"seconds": 0.0, "calls": 0}
    starts: dict[int, float] = {}

    def start(module, _args):
        starts[id(module)] = time.perf_counter()

    def stop(module, _args, _output):
        clock["seconds"] += time.perf_counter() - starts[id(module)]
        clock["calls"] += 1

    handles = [h for m in modules for h in (m.register_forward_pre_hook(start), m.register_forward_hook(stop))]
    try:
        yield clock
    finally:
        for h in handles:
            h.remove()


def evaluate_at(model: nn.Module, tokenizer, tau: float, config: EvalConfig | None = None, *, task=None,
                texts: Sequence[str] | None = None) -> dict:
    """One point: set τ, evaluate, and read back the cost of exactly those forwards."""
    tau = check_tau(tau)
    set_tau(model, tau)
    reset_cost(model)
    with forward_timer(model) as clock:
        result = evaluate(model, tokenizer, config, task=task, texts=texts)
    return {"tau": tau, **result, **cost(model), "forward_seconds": clock["seconds"], "forward_calls": clock["calls"],
            "latency_seconds": clock["seconds"] / max(clock["calls"], 1)}  # per forward pass (one batch)


def tau_sweep(model: nn.Module, tokenizer, taus: Sequence[float] = DEFAULT_TAUS, config: EvalConfig | None = None, *,
              task=None, texts: Sequence[str] | None = None) -> list[dict]:
    kind_of(model)  # a clear error before any work on a model that is not dynamic
    taus = [check_tau(t) for t in taus]
    if len(taus) < 1:
        raise LeanformerError("the τ sweep needs at least one τ")
    return [evaluate_at(model, tokenizer, t, config, task=task, texts=texts) for t in taus]


def quality_metric(row: dict) -> str:
    """The metric a cost/quality curve plots: perplexity for LMs, else the task's first metric."""
    if "perplexity" in row:
        return "perplexity"
    skip = {"tau", "task", "tokens", "forward_seconds", "forward_calls", "n_tokens", "latency_seconds"}
    return next(k for k, v in row.items() if isinstance(v, float) and k not in skip
                and "flops" not in k and "per_token" not in k and "fraction" not in k and "share" not in k)


def sweep_table(rows: list[dict]) -> str:
    """Markdown table: τ, the quality metric, MLP and total FLOPs per token (fraction of dense), forward seconds."""
    metric = quality_metric(rows[0])
    exits = "exit_counts" in rows[0]  # early exit: how many examples left after each block
    lines = [f"| τ | {metric} | MLP FLOPs/token | FLOPs/token | forward s |" + (" layers run | exits per block |" if exits
                                                                              else ""),
             "|---|---|---|---|---|" + ("---|---|" if exits else "")]
    for r in rows:
        lines.append(f"| {r['tau']:.3g} | {r[metric]:.4f} | {_fraction(r['mlp_flops_per_token'])} | "
                     f"{_fraction(r['flops_per_token'])} | {r['forward_seconds']:.3f} |"
                     + (f" {_fraction(r['layers_executed'])} | {' / '.join(map(str, r['exit_counts']))} |" if exits
                        else ""))
    return "\n".join(lines) + "\n"


def _fraction(value) -> str:
    return "—" if value is None else f"{value:.3f}"


def plot_sweep(rows: list[dict], title: str = "") -> bytes:
    """PNG: the quality metric against MLP and total FLOPs per token (fractions of dense), τ labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = quality_metric(rows[0])
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    for key, label, marker in (("flops_per_token", "all FLOPs", "o"), ("mlp_flops_per_token", "MLP FLOPs", "s")):
        pts = sorted((r[key], r[metric], r["tau"]) for r in rows if r.get(key) is not None)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=label)
            for x, y, t in pts:
                ax.annotate(f"{t:g}", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
    ax.set_xlabel("executed FLOPs per token (fraction of dense)")
    ax.set_ylabel(metric + (" (lower is better)" if metric in LOWER_IS_BETTER else ""))
    ax.set_title(title or "quality vs cost over τ (labels: τ)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def write_sweep(rows: list[dict], directory: Path, title: str = "") -> list[Path]:
    """tau_sweep.md and tau_sweep.png inside `directory` (an output directory being staged)."""
    directory = Path(directory)
    (directory / "tau_sweep.md").write_text(sweep_table(rows), encoding="utf-8")
    (directory / "tau_sweep.png").write_bytes(plot_sweep(rows, title))
    return [directory / "tau_sweep.md", directory / "tau_sweep.png"]

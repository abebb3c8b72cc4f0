"""Honest size accounting: every stored byte of a quantized layer, per weight.

A QuantizedLinear stores exactly the tensors `dequantize` reads (packed indices, codebooks,
scales, zeros, step sizes, domain bits, seeds); all of them count, at their stored dtype. Biases
are reported separately (every method keeps them in full precision, so they are not weight bits).
Target-like Linear layers left in full precision (e.g. Kashin layers that did not converge) count
at their own dtype.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from ..stack import applied
from ..targets import LINEAR_TYPES
from .quantization import QuantizedLinear


def _nbytes(t) -> int:
    return t.numel() * t.element_size()


@dataclass
class SizeReport:
    layers: list[dict] = field(default_factory=list)
    total: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"layers": self.layers, "total": self.total}

    def __str__(self):
        lines = [f"{'layer':<48} {'method':>7} {'weights':>9} {'bytes':>9} {'bits/w':>7}"]
        for r in self.layers:
            lines.append(f"{r['name']:<48} {r['method']:>7} {r['n_weights']:>9} {r['bytes']:>9} {r['bits_per_weight']:>7.3f}")
        t = self.total
        lines.append(f"{'total (linear layers)':<48} {'':>7} {t['n_weights']:>9} {t['bytes']:>9} {t['bits_per_weight']:>7.3f}")
        lines.append(f"whole model: {t['model_bytes'] / 2**20:.2f} MiB "
                     f"(of which {t['other_bytes'] / 2**20:.2f} MiB embeddings, norms, biases, heads)")
        return "\n".join(lines)


def size_report(model: nn.Module) -> SizeReport:
    """Bits per weight including codebooks, scales, zeros, norms and seeds, per layer and in total.

    Rows: every QuantizedLinear, plus the Linear layers a quantization config targeted but kept in
    full precision (the `skipped` layers of the model's quantize transforms).
    """
    rep = SizeReport()
    skipped = {n for e in applied(model) if e.transform == "quantize" for n in e.state["skipped"]}
    counted: set[str] = set()  # state-dict keys of the layers above
    for name, m in model.named_modules():
        if isinstance(m, QuantizedLinear):
            parts = m.stored_nbytes()
            n = m.in_features * m.out_features
            nbytes = sum(parts.values())
            rep.layers.append({"name": name, "method": m.method, "index_bits": m.header["bits"], "n_weights": n,
                               "bytes": nbytes, "bits_per_weight": 8 * nbytes / n, "breakdown": parts,
                               "bias_bytes": _nbytes(m.bias) if m.bias is not None else 0})
            counted.update(f"{name}.{k}" for k in parts)
        elif isinstance(m, tuple(LINEAR_TYPES)) and name in skipped:
            nbytes = _nbytes(m.weight)
            rep.layers.append({"name": name, "method": "none", "index_bits": None, "n_weights": m.weight.numel(),
                               "bytes": nbytes, "bits_per_weight": 8 * nbytes / m.weight.numel(),
                               "breakdown": {"weight": nbytes},
                               "bias_bytes": _nbytes(m.bias) if m.bias is not None else 0})
            counted.add(f"{name}.weight")
    n_w = sum(r["n_weights"] for r in rep.layers)
    b = sum(r["bytes"] for r in rep.layers)
    # everything else the model stores once (tied tensors counted once), at its dtype
    seen, other = set(), 0
    for k, t in model.state_dict(keep_vars=True).items():  # what a save writes (persistent buffers only)
        if k in counted or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        other += _nbytes(t)
    rep.total = {"n_weights": n_w, "bytes": b, "bits_per_weight": 8 * b / n_w if n_w else float("nan"),
                 "other_bytes": other, "model_bytes": b + other,
                 "layers_quantized": sum(r["method"] != "none" for r in rep.layers),
                 "layers_full_precision": sum(r["method"] == "none" for r in rep.layers)}
    return rep

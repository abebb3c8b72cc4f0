"""Block-list surgery inside transformers models: swap the blocks and keep what transformers reads
about them (config.num_hidden_layers, config.layer_types, each attention's layer_idx, and the
output-capturing hooks of `output_hidden_states`) consistent with the new list."""
from __future__ import annotations

from torch import nn

from ..architectures import find_blocks


def set_blocks(model: nn.Module, new_blocks: list[nn.Module], is_stand_in=lambda b: False) -> None:
    """Replace the block list's contents by `new_blocks`; `is_stand_in(b)` marks modules that stand in
    for removed blocks (they get no KV-cache index and report hidden states like a block)."""
    blocks, _ = find_blocks(model)
    kept_old = [i for i, b in enumerate(blocks) if any(b is nb for nb in new_blocks)]
    del blocks[:]
    blocks.extend(new_blocks)
    cfg = model.config
    # Some models loop over layers[:config.num_hidden_layers]: the in-memory list (maps included) must all run.
    cfg.num_hidden_layers = len(new_blocks)
    if isinstance(getattr(cfg, "layer_types", None), list):
        old_types = cfg.layer_types
        types, it = [], iter(kept_old)
        for b in new_blocks:
            types.append(old_types[next(it)] if not is_stand_in(b) else old_types[0])
        cfg.layer_types = types
    for b in new_blocks:
        if is_stand_in(b):
            record_hidden_states(b)
    # KV caches are indexed by layer_idx: renumber real blocks 0,1,… in order.
    k = 0
    for b in new_blocks:
        if is_stand_in(b):
            continue
        for m in b.modules():
            if hasattr(m, "layer_idx") and isinstance(m.layer_idx, int):
                m.layer_idx = k
        k += 1


def record_hidden_states(block: nn.Module) -> None:
    """transformers records `output_hidden_states` with hooks on its own block classes; give a map the
    same hook so it reports its output like the blocks it replaced (once per module)."""
    if getattr(block, "_lf_records_hidden_states", False):
        return
    try:
        from transformers.utils.output_capturing import install_output_capuring_hook
    except ImportError:  # older transformers collect hidden states in the layer loop: nothing to do
        return
    install_output_capuring_hook(block, "hidden_states", 0, True)
    block._lf_records_hidden_states = True



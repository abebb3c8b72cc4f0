"""Parameter-efficient adapters: one protocol (base.py), one file per method, save/load/export (io.py)."""
from .base import (AdapterConfig, AdaptedLinear, LowRankConfig, METHODS, active_adapter, adapt, merge,
                   print_trainable_parameters, resolve_targets, set_adapter, set_rank, strip_adapters,
                   trainable_parameters, unmerge)
from .dylora import DyLoRA
from .krona import KronA
from .lora import LoRA
from .lora_xs import LoRAXS
from .io import export_peft, fingerprint, load_adapter, save_adapter

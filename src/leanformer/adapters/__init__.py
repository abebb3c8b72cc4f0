"""Parameter-efficient adapters: one protocol and verb (base.py), one file per method, peft export."""
from .base import (AdapterConfig, AdaptedLinear, LowRankConfig, METHODS, active_adapter, adapt, adapter_configs, merge,
                   print_trainable_parameters, set_adapter, set_rank, strip_adapters, trainable_parameters, unmerge)
from .dylora import DyLoRA
from .krona import KronA
from .lora import LoRA
from .lora_xs import LoRAXS
from .sparsegrad import MeProp, SparseGrad
from .peft_export import export_peft

"""Compression: weight quantization (Kashin and KashinGPTQ, with RTN, HQQ and GPTQ as baselines) and layer pruning.

Importing the package registers every quantization method (each config class registers itself)."""
from .gptq import GPTQ
from .hqq import HQQ
from .kashin import Kashin
from .kashin_gptq import KashinGPTQ
from .plan import PlanConfig, QuantPlan
from .quantization import METHODS, QuantConfig, QuantizedLinear, QuantizeReport, quantize, relative_weight_errors
from .rtn import RTN
from .size import SizeReport, size_report

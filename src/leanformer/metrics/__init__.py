"""Layer-geometry metrics (linearity: Razzhigaev et al. 2024; anisotropy and intrinsic dimension: Razzhigaev et al., EACL 2024 Findings; TwoNN: Facco et al. 2017): pure functions on (n, d) tensors, plus streaming accumulators (geometry here, the logit lens in metrics.logit_lens)."""
from .spectrum import anisotropy
from .linear_fit import linearity, linearity_wo_residual
from .similarity import angular_distance, block_influence, mlp_sparsity
from .streaming import GeometryAccumulator, sample_positions
from .twonn import intrinsic_dimension

__all__ = ["linearity", "linearity_wo_residual", "anisotropy", "intrinsic_dimension", "block_influence",
           "angular_distance", "mlp_sparsity", "GeometryAccumulator", "sample_positions"]

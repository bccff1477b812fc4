"""gavamoe_kernels: fused kernels for cluster-gated fine-grained MoE layers.

Public API (see DESIGN.md): route, moe_experts, cluster_gated_moe, ClusterGatedMoE,
replace_mlp_with_moe (and restore_dense_mlp), gmm_log_responsibilities, gmm_responsibilities,
fit_gmm, use_backend.
"""

from ._backend import BackendUnavailableError, use_backend
from .gmm.em import GmmParams, fit_gmm
from .gmm.ops import gmm_log_prob, gmm_log_responsibilities, gmm_responsibilities
from .moe.hf import replace_mlp_with_moe, restore_dense_mlp
from .moe.layer import ClusterGatedMoE, collect_aux_loss
from .moe.ops import Routing, cluster_gated_moe, moe_experts, route

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "ClusterGatedMoE",
    "GmmParams",
    "Routing",
    "__version__",
    "cluster_gated_moe",
    "collect_aux_loss",
    "fit_gmm",
    "gmm_log_prob",
    "gmm_log_responsibilities",
    "gmm_responsibilities",
    "moe_experts",
    "replace_mlp_with_moe",
    "restore_dense_mlp",
    "route",
    "use_backend",
]

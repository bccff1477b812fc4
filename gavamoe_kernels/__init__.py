"""gavamoe_kernels: fused kernels for cluster-gated fine-grained MoE layers."""

from ._backend import BackendUnavailableError, use_backend
from .moe.ops import Routing, cluster_gated_moe, moe_experts, route

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "Routing",
    "__version__",
    "cluster_gated_moe",
    "moe_experts",
    "route",
    "use_backend",
]

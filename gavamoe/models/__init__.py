"""GaVaMoE models: the stage-1 VAE with a Gaussian-mixture prior and the stage-2 MoE explainer."""

from .explainer import Explainer, ExplainerConfig
from .vae_gmm import VaeGmm, VaeGmmConfig

__all__ = ["Explainer", "ExplainerConfig", "VaeGmm", "VaeGmmConfig"]

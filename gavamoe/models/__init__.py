"""GaVaMoE models: stage 1 VAE with a Gaussian-mixture prior (stage 2 explainer to come)."""

from .vae_gmm import VaeGmm, VaeGmmConfig

__all__ = ["VaeGmm", "VaeGmmConfig"]

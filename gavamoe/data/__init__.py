"""Data for GaVaMoE: the PETER/PEPLER review format, a synthetic generator, tensor helpers."""

from .peter import RefusedPickleError, ReviewData, load_peter, restricted_load
from .synthetic import make_synthetic

__all__ = ["RefusedPickleError", "ReviewData", "load_peter", "make_synthetic", "restricted_load"]

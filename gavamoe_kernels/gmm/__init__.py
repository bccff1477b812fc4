"""Diagonal Gaussian-mixture responsibilities (reference, torch and Triton backends) and EM."""

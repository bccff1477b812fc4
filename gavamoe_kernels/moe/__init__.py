"""Cluster-gated fine-grained MoE: reference maths, torch and Triton backends, layer, HF patching."""

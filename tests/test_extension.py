"""The CUDA extension's build and loading, checked on any machine: setup.py's build plan,
kernels free of ATen (so `make cuda-check` compiles them with nvcc alone), and clear errors
where the extension is not built. The kernels themselves are tested in tests/*/test_cuda.py (GPU)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch

import gavamoe_kernels as gk
from gavamoe_kernels import _extension
from gavamoe_kernels._backend import resolve_backend

ROOT = Path(__file__).resolve().parent.parent


def _setup_module():
    spec = importlib.util.spec_from_file_location("gavamoe_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # __name__ is not "__main__": setup() does not run
    return module


def test_skip_variable_skips_the_build():
    plan = _setup_module().cuda_build_plan({"GAVAMOE_SKIP_CUDA_BUILD": "1"})
    assert plan[0] == [] and plan[1] == {} and "GAVAMOE_SKIP_CUDA_BUILD" in plan[2]


@pytest.mark.skipif(torch.version.cuda is not None, reason="checks the CPU-only torch path")
def test_cpu_torch_installs_without_the_extension():
    ext_modules, cmdclass, reason = _setup_module().cuda_build_plan({})
    assert ext_modules == [] and cmdclass == {} and "CPU build" in reason


def test_cuda_torch_with_nvcc_builds_every_source_for_the_default_architectures(monkeypatch):
    from torch.utils import cpp_extension

    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", "/usr/local/cuda")
    setup_py = _setup_module()
    environ = {}
    (extension,), cmdclass, reason = setup_py.cuda_build_plan(environ)
    assert extension.name == "gavamoe_kernels._C"
    assert sorted(extension.sources) == sorted(
        [f"csrc/{p.name}" for p in (ROOT / "csrc").glob("*.cu")] + ["csrc/bindings.cpp"])
    assert environ["TORCH_CUDA_ARCH_LIST"] == "8.0;9.0" and "8.0;9.0" in reason  # never asks a GPU
    assert "build_ext" in cmdclass
    environ = {"TORCH_CUDA_ARCH_LIST": "9.0a"}
    setup_py.cuda_build_plan(environ)
    assert environ["TORCH_CUDA_ARCH_LIST"] == "9.0a"
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)
    assert "nvcc was not found" in setup_py.cuda_build_plan({})[2]


def test_kernel_sources_do_not_include_torch():
    """Only bindings.cpp may see torch; everything else compiles with nvcc alone (make cuda-check)."""
    sources = [p for p in (ROOT / "csrc").iterdir() if p.suffix in (".cu", ".cuh", ".h")]
    assert {p.suffix for p in sources} >= {".cu", ".h"}
    for path in sources:
        includes = re.findall(r'#include\s*[<"]([^>"]+)[>"]', path.read_text())
        assert not [i for i in includes if i.split("/")[0] in ("torch", "ATen", "c10", "pybind11")], path.name


@pytest.mark.skipif(_extension.available(), reason="the extension is built here")
def test_unbuilt_extension_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("GAVAMOE_CUDA_JIT", raising=False)
    _extension.extension.cache_clear()
    with pytest.raises(ImportError, match=r"csrc/README\.md"):
        _extension.extension()
    if not torch.cuda.is_available():
        with pytest.raises(gk.BackendUnavailableError, match="CUDA tensors"):
            resolve_backend(torch.device("cpu"), "cuda")
        with pytest.raises(gk.BackendUnavailableError, match="cuda"):
            gk.gmm_log_responsibilities(torch.randn(3, 2), torch.zeros(2), torch.zeros(2, 2), torch.zeros(2, 2),
                                        backend="cuda")
    else:
        with pytest.raises(gk.BackendUnavailableError, match="not built"):
            resolve_backend(torch.device("cuda"), "cuda")


def test_jit_build_is_asked_for_by_environment(monkeypatch):
    monkeypatch.setenv("GAVAMOE_CUDA_JIT", "1")
    assert _extension.jit_requested() and _extension.available()
    monkeypatch.setenv("GAVAMOE_CUDA_JIT", "0")
    assert not _extension.jit_requested()


def test_cuda_check_reads_each_kernels_resources_from_ptxas():
    spec = importlib.util.spec_from_file_location("cuda_check", ROOT / "csrc" / "cuda_check.py")
    cuda_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cuda_check)
    log = ("ptxas info    : 0 bytes gmem\n"
           "ptxas info    : Compiling entry function '_ZN7gavamoe6kernelEv' for 'sm_90'\n"
           "ptxas info    : Function properties for _ZN7gavamoe6kernelEv\n"
           "    24 bytes stack frame, 68 bytes spill stores, 84 bytes spill loads\n"
           "ptxas info    : Used 64 registers, used 1 barriers, 24 bytes cumulative stack size, 33472 bytes smem\n"
           "ptxas info    : Compiling entry function 'plain' for 'sm_90'\n"
           "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
           "ptxas info    : Used 16 registers, used 0 barriers\n")
    rows = cuda_check.kernel_resources(log)
    assert [r[1:] for r in rows] == [(64, 24, 68, 84, 33472), (16, 0, 0, 0, 0)]
    assert rows[1][0] == "plain" and rows[0][0] in ("gavamoe::kernel", "_ZN7gavamoe6kernelEv")  # c++filt or not

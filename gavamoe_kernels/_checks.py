"""Input validation shared by the public functions: clear ValueErrors before any kernel runs."""

from __future__ import annotations

import os
import weakref

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int32, torch.int64)


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def check_tensor(name: str, t, expected: str, ndim: int, dtypes=FLOAT_DTYPES) -> None:
    """``t`` is a tensor of rank ``ndim`` with a dtype in ``dtypes``; ``expected`` names the shape."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape {expected}, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have shape {expected} ({ndim}-D), got shape {_shape(t)}")
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{name} must have dtype in ({allowed}), got {str(t.dtype).replace('torch.', '')}")


def check_dim(name: str, t: torch.Tensor, dim: int, size: int, expected: str) -> None:
    if t.shape[dim] != size:
        raise ValueError(f"{name} must have shape {expected} with {size} at dim {dim}, got shape {_shape(t)}")


def check_same_device(reference_name: str, reference: torch.Tensor, **others: torch.Tensor) -> None:
    for name, t in others.items():
        if t.device != reference.device:
            raise ValueError(f"{name} is on {t.device} but {reference_name} is on {reference.device}")


def check_same_dtype(reference_name: str, reference: torch.Tensor, **others: torch.Tensor) -> None:
    for name, t in others.items():
        if t.dtype != reference.dtype:
            raise ValueError(
                f"{name} has dtype {t.dtype} but {reference_name} has dtype {reference.dtype}; "
                f"cast them to one dtype"
            )


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}")
    return value


def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


ID_CHECK_MODES = ("auto", "sync", "off")
_checked: dict[int, tuple[weakref.ref, int, int]] = {}  # id(ids) -> (ref, version, upper) of passed checks
_CHECKED_MAX = 256


def id_check_mode() -> str:
    """GAVAMOE_ID_CHECK: "auto" (default: a ValueError on the CPU, a device-side assertion on a
    GPU, so the stream is not stalled), "sync" (a ValueError everywhere: one host read, which
    stalls a GPU stream), or "off"."""
    mode = os.environ.get("GAVAMOE_ID_CHECK", "auto")
    if mode not in ID_CHECK_MODES:
        raise ValueError(f"GAVAMOE_ID_CHECK must be one of {ID_CHECK_MODES}, got {mode!r}")
    return mode


def _passed_before(ids: torch.Tensor, upper: int) -> bool:
    """This very tensor, unmodified since (same version counter), passed a check with this bound:
    a model's layers and decoding steps share one cluster-id tensor, which is checked once."""
    entry = _checked.get(id(ids))
    return (entry is not None and entry[0]() is ids and not ids.is_inference() and entry[1] == ids._version
            and entry[2] == upper)


def _remember(ids: torch.Tensor, upper: int) -> None:
    if ids.is_inference():  # no version counter to tell an in-place change
        return
    if len(_checked) >= _CHECKED_MAX:
        _checked.clear()
    key = id(ids)
    _checked[key] = (weakref.ref(ids, lambda _, key=key: _checked.pop(key, None)), ids._version, upper)


def check_index_range(name: str, ids: torch.Tensor, upper: int) -> None:
    """Every value of ``ids`` lies in [0, upper).

    On the CPU (and with GAVAMOE_ID_CHECK=sync) a ValueError before any kernel runs: one host
    read of two scalars. On a GPU a device-side assertion, queued on the stream without a host
    sync (a failure surfaces as a CUDA error at the next synchronisation). Skipped while tracing
    for torch.compile, where values are unknown, for a host read during CUDA-graph capture, and
    for a tensor that passed before and has not been modified since."""
    mode = id_check_mode()
    if ids.numel() == 0 or mode == "off" or torch.compiler.is_compiling() or _passed_before(ids, upper):
        return
    if ids.device.type == "cuda" and mode == "auto":
        torch._assert_async(((ids >= 0) & (ids < upper)).all(),
                            f"gavamoe_kernels: {name} must hold values in [0, {upper})")
    else:
        if ids.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return
        lo, hi = (int(v) for v in torch.stack(torch.aminmax(ids)).tolist())
        if lo < 0 or hi >= upper:
            raise ValueError(f"{name} must hold values in [0, {upper}); found values in [{lo}, {hi}]")
    _remember(ids, upper)

"""Input validation shared by the public functions: clear ValueErrors before any kernel runs."""

from __future__ import annotations

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


def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def values_checkable() -> bool:
    """Value checks read tensor contents on the host; they are skipped while tracing for
    torch.compile or capturing a CUDA graph, where a host read is impossible."""
    if torch.compiler.is_compiling():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def check_index_range(name: str, ids: torch.Tensor, upper: int) -> None:
    """Every value of ``ids`` lies in [0, upper). One host read of two scalars."""
    if ids.numel() == 0 or not values_checkable():
        return
    lo, hi = (int(v) for v in torch.stack(torch.aminmax(ids)).tolist())
    if lo < 0 or hi >= upper:
        raise ValueError(f"{name} must hold values in [0, {upper}); found values in [{lo}, {hi}]")

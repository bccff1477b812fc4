"""Comparison helpers shared by the tests (and usable by downstream projects testing backends).

Pass rule (STYLE.md): a kernel's max error against a float64 reference may be at most twice
the error of plain PyTorch computing the same thing in the kernel's dtype, plus a small atol.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

INT_POISON = -(2**30)


def max_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max |a - b| in float64; NaN anywhere (in either) gives inf, so a NaN never passes."""
    diff = (a.double() - b.double()).abs()
    if diff.numel() == 0:
        return 0.0
    return float("inf") if torch.isnan(diff).any() else diff.max().item()


def assert_close_to_reference(name: str, out: torch.Tensor, reference: torch.Tensor,
                              baseline: torch.Tensor, atol: float) -> None:
    """``out`` (kernel) and ``baseline`` (plain torch in the kernel's dtype) against a float64 reference."""
    if out.shape != reference.shape:
        raise AssertionError(f"{name}: shape {tuple(out.shape)} != reference {tuple(reference.shape)}")
    err = max_error(out, reference)
    base = max_error(baseline, reference)
    if not err <= 2 * base + atol:
        raise AssertionError(f"{name}: error {err:.3e} > 2 x baseline error {base:.3e} + atol {atol:.1e}")


def assert_same_topk(ids: torch.Tensor, reference_probs: torch.Tensor, k: int, tol: float = 1e-5) -> None:
    """``ids`` pick the top-k of ``reference_probs`` (float64): equal where the reference order is
    clear, and only swapped between experts whose probabilities differ by less than ``tol``."""
    picked = reference_probs.gather(-1, ids.long())
    best, _ = torch.sort(reference_probs, dim=-1, descending=True, stable=True)
    gap = (picked - best[..., :k]).abs().max().item() if ids.numel() else 0.0
    if gap > tol:
        raise AssertionError(f"top-k ids differ from the reference beyond ties: probability gap {gap:.3e}")
    if ids.numel() and (ids.sort(-1).values.diff(dim=-1) == 0).any():
        raise AssertionError("top-k ids repeat an expert within a token")


@contextlib.contextmanager
def poisoned_empty() -> Iterator[None]:
    """Make torch.empty, torch.empty_like and Tensor.new_empty return NaN-filled floats and
    INT_POISON-filled integers, so that an output element a kernel forgets to write fails the
    comparison. (Allocations made inside C++ are not reached; every Python-side one is.)"""
    real_empty, real_empty_like, real_new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty

    def fill(t: torch.Tensor) -> torch.Tensor:
        if t.is_floating_point() and not t.is_meta:
            return t.fill_(float("nan"))
        if t.dtype in (torch.int32, torch.int64) and not t.is_meta:
            return t.fill_(INT_POISON)
        return t

    def new_empty(self, *a, **kw):
        return fill(real_new_empty(self, *a, **kw))

    def empty(*a, **kw):
        if kw.get("device") is None:  # a Python wrapper is not seen by a `with torch.device(...)` context
            kw["device"] = torch.get_default_device()
        return fill(real_empty(*a, **kw))

    torch.empty = empty
    torch.empty_like = lambda *a, **kw: fill(real_empty_like(*a, **kw))
    torch.Tensor.new_empty = new_empty
    try:
        yield
    finally:
        torch.empty, torch.empty_like, torch.Tensor.new_empty = real_empty, real_empty_like, real_new_empty

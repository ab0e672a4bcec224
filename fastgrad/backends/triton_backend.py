"""Triton backend: fused statistics, scale and clamp (kernels: :mod:`fastgrad.triton_kernels`).

It serves CUDA tensors when Triton imports and its kernels were compiled for
the GPU, and CPU tensors only under ``TRITON_INTERPRET=1`` (the Triton
interpreter, for testing without a GPU). Triton decides compiled versus
interpreted when the kernels are defined, so the variable must be set before
:mod:`fastgrad.triton_kernels` is first imported; the two modes exclude each
other in one process.

Triton is imported on the first question about a CUDA tensor, or about a CPU
tensor with ``TRITON_INTERPRET=1``: a plain CPU run never pays for it.
"""

from __future__ import annotations

import os

import torch

from ..spec import StatsResult
from .base import empty_result

SUPPORTED = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

_kernels = None
_load_error: str | None = None


def _load():
    """The kernels module, or None with ``_load_error`` saying why."""
    global _kernels, _load_error
    if _kernels is None and _load_error is None:
        try:
            from .. import triton_kernels
        except ImportError as e:
            _load_error = f"Triton is not importable ({e}); pip install triton"
        else:
            _kernels = triton_kernels
    return _kernels


def _interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


class TritonBackend:
    name = "triton"

    def why_not(self, device: torch.device, dtype: torch.dtype) -> str | None:
        if dtype not in SUPPORTED:
            return f"dtype {dtype} is not supported"
        if device.type == "cpu":
            if not _interpret_requested():
                return "it runs on CPU tensors only under the Triton interpreter (TRITON_INTERPRET=1)"
            k = _load()
            if k is None:
                return _load_error
            if not k.INTERPRETED:
                return (
                    "its kernels were compiled for the GPU because TRITON_INTERPRET was unset "
                    "when fastgrad.triton_kernels was imported"
                )
            return None
        if device.type != "cuda":
            return f"it runs on CUDA tensors (or CPU under TRITON_INTERPRET=1), not {device.type}"
        k = _load()
        if k is None:
            return _load_error
        if k.INTERPRETED:
            # The interpreter dereferences the pointer table on the host.
            return "TRITON_INTERPRET=1 was set when its kernels were built: they only run on CPU tensors"
        if not torch.cuda.is_available():
            return "no CUDA device is visible"
        return None

    def stats(self, tensors, spec) -> StatsResult:
        """Rows, element counts and the total row (made by the last kernel)."""
        if not tensors:
            return empty_result(spec, torch.device("cpu"))
        return StatsResult(*_load().grad_stats_full(list(tensors), spec))

    def scale_(self, tensors, coef: torch.Tensor) -> None:
        _load().scale_(list(tensors), coef)

    def clamp_(self, tensors, clip_value: float) -> None:
        _load().clamp_(list(tensors), clip_value)


BACKEND = TritonBackend()

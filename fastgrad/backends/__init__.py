"""Backends: each computes :class:`fastgrad.spec.RawStats` and the in-place scale/clamp ops.

A backend object has ``name``, ``why_not(device, dtype) -> str | None`` (None
means it can serve that input) and ``stats``, ``scale_``, ``clamp_``. They are
created on first use so that a missing compiler or Triton costs nothing at
import time.
"""

from __future__ import annotations

import importlib

BACKEND_NAMES = ("reference", "cpu", "triton", "cuda")
_MODULES = {
    "reference": "fastgrad.backends.reference_backend",
    "cpu": "fastgrad.backends.cpu",
    "triton": "fastgrad.backends.triton_backend",
    "cuda": "fastgrad.backends.cuda",
}
_cache: dict = {}


def get_backend(name: str):
    """The backend object called ``name`` (one of :data:`BACKEND_NAMES`)."""
    b = _cache.get(name)
    if b is None:
        b = _cache[name] = importlib.import_module(_MODULES[name]).BACKEND
    return b

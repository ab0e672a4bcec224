"""Which instruction-set path the C++ CPU kernels (``fastgrad._C``) run.

A portable build (the default, and every wheel) holds the kernels several times:
``baseline`` (any x86-64: SSE2; any aarch64), ``avx2`` (x86-64-v3: AVX2, FMA, BMI2, F16C) and
``avx512`` (x86-64-v4: AVX-512 F/BW/CD/DQ/VL). When ``fastgrad._C`` loads, the widest path the
CPU runs is chosen, or the one the environment variable ``FASTGRAD_CPU_ISA``
(``baseline|avx2|avx512|auto``) names; naming a path the CPU lacks is refused (every CPU kernel
call raises ``RuntimeError`` saying so). A source build with ``FASTGRAD_CPU_ARCH=native`` holds
one path, ``march=native``.

All paths return bitwise identical results (same 16-lane summation order; fused multiply-add only
where it rounds exactly as a multiply then an add): a path changes speed only. ``fastgrad backends`` prints the running path.

The paths are read and switched through a small C interface of the module
(csrc/cpu/cpu_dispatch.cpp), loaded with ctypes from the module's own file.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
from collections.abc import Iterator

__all__ = ["current", "compiled", "supported", "error", "select", "forced"]


@functools.lru_cache(maxsize=1)
def _lib() -> ctypes.CDLL | None:
    try:
        from . import _C
    except ImportError:
        return None
    lib = ctypes.CDLL(_C.__file__)  # the already loaded module: same handle, same state
    try:
        for name in ("fastgrad_cpu_isa", "fastgrad_cpu_isa_error", "fastgrad_cpu_isa_compiled",
                     "fastgrad_cpu_isa_supported"):
            getattr(lib, name).restype = ctypes.c_char_p
            getattr(lib, name).argtypes = []
        lib.fastgrad_cpu_isa_select.restype = ctypes.c_int
        lib.fastgrad_cpu_isa_select.argtypes = [ctypes.c_char_p]
    except AttributeError:  # a module built before the dispatch existed
        return None
    return lib


def _str(fn: str) -> str:
    lib = _lib()
    return getattr(lib, fn)().decode() if lib is not None else ""


def current() -> str | None:
    """The running path (``"baseline"``, ``"avx2"``, ``"avx512"``, ``"march=native"``), or None
    when ``fastgrad._C`` is missing or ``FASTGRAD_CPU_ISA`` was refused (see :func:`error`)."""
    return _str("fastgrad_cpu_isa") or None


def compiled() -> list[str]:
    """The paths this build holds, narrowest first."""
    return [p for p in _str("fastgrad_cpu_isa_compiled").split(",") if p]


def supported() -> list[str]:
    """The paths of this build that this CPU runs, narrowest first."""
    return [p for p in _str("fastgrad_cpu_isa_supported").split(",") if p]


def error() -> str:
    """Why no path runs (a refused ``FASTGRAD_CPU_ISA``), or why the last :func:`select` failed."""
    return _str("fastgrad_cpu_isa_error")


def select(name: str) -> None:
    """Run the CPU kernels on path ``name`` from now on (``"auto"``: the widest this CPU runs).

    Raises:
        RuntimeError: ``fastgrad._C`` is not available.
        ValueError: this build has no such path, or this CPU lacks its instructions (the running
            path is unchanged).
    """
    lib = _lib()
    if lib is None:
        raise RuntimeError("fastgrad._C (the C++ CPU kernels) is not available: no CPU path to select")
    if lib.fastgrad_cpu_isa_select(name.encode()) != 0:
        raise ValueError(f"cannot select CPU path {name!r}: {error()}")


@contextlib.contextmanager
def forced(name: str) -> Iterator[None]:
    """Run the block on path ``name``, then go back to the path that ran before."""
    before = current() or "auto"
    select(name)
    try:
        yield
    finally:
        select(before)

"""CUDA C++ backend: not built yet (GPU issue); refuses every input with the reason."""

from __future__ import annotations


class CudaBackend:
    name = "cuda"

    def why_not(self, device, dtype):
        return "the CUDA kernels are not implemented yet"


BACKEND = CudaBackend()

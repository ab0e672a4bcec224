"""Triton backend: not built yet (GPU issue); refuses every input with the reason."""

from __future__ import annotations


class TritonBackend:
    name = "triton"

    def why_not(self, device, dtype):
        return "the Triton kernels are not implemented yet"


BACKEND = TritonBackend()

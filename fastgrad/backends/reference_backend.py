"""The float64 reference as a backend: any device, any supported dtype, slow."""

from __future__ import annotations

from .. import reference


class ReferenceBackend:
    name = "reference"

    def why_not(self, device, dtype):
        return None

    stats = staticmethod(reference.stats_reference)
    scale_ = staticmethod(reference.scale_reference_)
    clamp_ = staticmethod(reference.clamp_reference_)


BACKEND = ReferenceBackend()

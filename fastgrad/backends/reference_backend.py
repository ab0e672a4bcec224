"""The float64 reference as a backend: any device, any supported dtype, slow."""

from __future__ import annotations

import torch

from .. import aggregate, reference
from ..spec import StatsResult, StatsSpec
from .base import empty_result


class ReferenceBackend:
    name = "reference"

    def why_not(self, device, dtype):
        return None

    def stats(self, tensors, spec: StatsSpec) -> StatsResult:
        """Rows from :func:`fastgrad.reference.stats_reference`; the total row combines them with
        the same float64 formula the kernels implement (:func:`fastgrad.aggregate.aggregate`)."""
        if not tensors:
            return empty_result(spec, torch.device("cpu"))
        raw = reference.stats_reference(tensors, spec)
        device = raw.floats.device
        n = [t.numel() for t in tensors]
        numel = torch.tensor([*n, sum(n)], dtype=torch.int64).to(device)
        return StatsResult(raw, numel, aggregate.aggregate(raw, spec, aggregate.TOTAL))

    scale_ = staticmethod(reference.scale_reference_)
    clamp_ = staticmethod(reference.clamp_reference_)


BACKEND = ReferenceBackend()

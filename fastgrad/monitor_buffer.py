"""GradMonitor's device-side buffer: monitored steps wait on the device, then cross to the host in one copy.

Each buffered step is one float64 vector on the gradients' device — per layer
``[norm..., max_abs..., numel..., counts (NaN, +Inf, -Inf, zero, then histogram
bins when present) row by row]``, then the clip coefficient and the skip flag
when known — made with a single ``torch.cat`` and no ``.item()``. Its host-side
layout (step, time, layer names, number of bins, which extras) is kept beside
it. :meth:`StepBuffer.drain` concatenates the vectors, copies them to the host
at once (the only sync) and rebuilds :class:`~fastgrad.records.StepRecord` s.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from .records import StepRecord
from .spec import NUM_COUNTS
from .stats import GradStats


class _Pending:
    """Host-side layout of one buffered step (the device vector holds the numbers)."""

    __slots__ = ("bins", "has_clip", "has_skip", "names", "step", "time")

    def __init__(self, step, t, names, bins, has_clip, has_skip):
        self.step, self.time, self.names, self.bins = step, t, names, bins
        self.has_clip, self.has_skip = has_clip, has_skip


class StepBuffer:
    """Monitored steps not yet copied to the host."""

    def __init__(self) -> None:
        self._vecs: list[torch.Tensor] = []
        self._layout: list[_Pending] = []

    def __len__(self) -> int:
        return len(self._vecs)

    def append(self, step: int, rows: GradStats, p: float, bins: int,
               clip_coef: torch.Tensor | float | None, skipped: torch.Tensor | bool | None) -> None:
        """Buffer ``rows`` (per-layer statistics) of ``step``: the ``p``-norm, and ``bins`` histogram bins (0 = none).

        Never synchronises.
        """
        counts = rows.raw.counts if bins else rows.raw.counts[:, :NUM_COUNTS]
        f64 = torch.float64
        dev = rows.raw.floats.device
        # the total row comes from the statistics themselves: under pipeline parallelism it is the
        # whole model's norm, while the layer rows are this stage's
        parts = [rows.norm(p), rows.max_abs, rows.numel.to(f64), counts.to(f64).reshape(-1),
                 rows.total.norm(p).reshape(1)]
        if clip_coef is not None:
            parts.append(torch.as_tensor(clip_coef, device=dev).to(f64).reshape(1))
        if skipped is not None:
            parts.append(torch.as_tensor(skipped, device=dev).to(f64).reshape(1))
        # One small copy per step: the backend may reuse its output buffers, and a
        # single contiguous vector per step makes the drain one cat + one transfer.
        self._vecs.append(torch.cat(parts))
        self._layout.append(_Pending(step, time.time(), rows.names, bins, clip_coef is not None,
                                     skipped is not None))

    def drain(self, norm_type: float) -> list[StepRecord]:
        """Copy every buffered step to the host (one transfer) and empty the buffer; the records, in order.

        ``total_norm`` of each record is the global ``norm_type``-norm of the statistics' total
        row (the whole model's, also under pipeline parallelism).
        """
        if not self._vecs:
            return []
        host = torch.cat(self._vecs).to("cpu").numpy()
        layout = self._layout
        self._vecs, self._layout = [], []
        records = []
        off = 0
        for lay in layout:
            g = len(lay.names)
            ncnt = NUM_COUNTS + lay.bins
            norm = host[off:off + g]
            max_abs = host[off + g:off + 2 * g]
            numel = host[off + 2 * g:off + 3 * g].astype(np.int64)
            off += 3 * g
            counts = host[off:off + g * ncnt].reshape(g, ncnt).astype(np.int64)
            off += g * ncnt
            total_norm = float(host[off])
            off += 1
            clip = skip = None
            if lay.has_clip:
                clip = float(host[off])
                off += 1
            if lay.has_skip:
                skip = bool(host[off])
                off += 1
            records.append(StepRecord(
                step=lay.step, time=lay.time, layers=tuple(lay.names), numel=numel, norm=norm.copy(),
                max_abs=max_abs.copy(), nan=counts[:, 0], posinf=counts[:, 1], neginf=counts[:, 2],
                zero=counts[:, 3], total_norm=total_norm,
                clip_coef=clip, skipped=skip, histograms=counts[:, NUM_COUNTS:] if lay.bins else None,
            ))
        return records

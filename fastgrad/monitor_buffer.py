"""GradMonitor's device-side buffer: monitored steps wait on the device, then cross to the host in one copy.

Each buffered step is one float64 vector on the gradients' device — per layer
``[norm..., max_abs..., numel..., counts (NaN, +Inf, -Inf, zero, then histogram
bins when present) row by row]``, then the clip coefficient and the skip flag
when known, then per layer the weight norms and their total (``params=True``
steps), then per layer the update norms and ratios and their two totals
(tracked updates) — made with a single ``torch.cat`` and no ``.item()``. Its host-side
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

    __slots__ = ("bins", "has_clip", "has_skip", "has_weights", "has_updates", "names", "step", "time")

    def __init__(self, step, t, names, bins, has_clip, has_skip, has_weights=False, has_updates=False):
        self.step, self.time, self.names, self.bins = step, t, names, bins
        self.has_clip, self.has_skip = has_clip, has_skip
        self.has_weights, self.has_updates = has_weights, has_updates


class StepBuffer:
    """Monitored steps not yet copied to the host."""

    def __init__(self) -> None:
        self._vecs: list[torch.Tensor] = []
        self._layout: list[_Pending] = []
        self.tail_values: list[float] = []  # the ``tail`` of the latest drain, on the host

    def __len__(self) -> int:
        return len(self._vecs)

    def append(self, step: int, rows: GradStats, p: float, bins: int,
               clip_coef: torch.Tensor | float | None, skipped: torch.Tensor | bool | None,
               weights: tuple[torch.Tensor, torch.Tensor] | None = None,
               updates: tuple[torch.Tensor, ...] | None = None) -> None:
        """Buffer ``rows`` (per-layer statistics) of ``step``: the ``p``-norm, and ``bins`` histogram bins (0 = none).

        ``weights``: (per-layer ``||w||`` ``[G]``, total 0-d); ``updates``: (per-layer ``||Δw||``
        ``[G]``, per-layer ratio ``[G]``, total norm 0-d, total ratio 0-d); float64 device tensors.
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
        for extra in (weights or ()), (updates or ()):
            parts += [t.to(dev, f64).reshape(-1) for t in extra]
        # One small copy per step: the backend may reuse its output buffers, and a
        # single contiguous vector per step makes the drain one cat + one transfer.
        self._vecs.append(torch.cat(parts))
        self._layout.append(_Pending(step, time.time(), rows.names, bins, clip_coef is not None,
                                     skipped is not None, weights is not None, updates is not None))

    def drain(self, norm_type: float, tail: tuple = ()) -> list[StepRecord]:
        """Copy every buffered step to the host (one transfer) and empty the buffer; the records, in order.

        ``tail``: 0-d tensors (e.g. the noise scale) copied in the same transfer, read back as
        :attr:`tail_values`.

        ``total_norm`` of each record is the global ``norm_type``-norm of the statistics' total
        row (the whole model's, also under pipeline parallelism).
        """
        if not self._vecs:
            return []
        dev = self._vecs[0].device
        tail_t = [torch.as_tensor(t).to(dev, torch.float64).reshape(1) for t in tail]
        host = torch.cat(self._vecs + tail_t).to("cpu").numpy()
        self.tail_values = host[len(host) - len(tail_t):].tolist() if tail_t else []
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
            extra: dict = {}
            if lay.has_weights:
                extra["param_norm"] = host[off:off + g].copy()
                extra["total_param_norm"] = float(host[off + g])
                off += g + 1
            if lay.has_updates:
                extra["update_norm"] = host[off:off + g].copy()
                extra["update_ratio"] = host[off + g:off + 2 * g].copy()
                extra["total_update_norm"] = float(host[off + 2 * g])
                extra["total_update_ratio"] = float(host[off + 2 * g + 1])
                off += 2 * g + 2
            records.append(StepRecord(
                step=lay.step, time=lay.time, layers=tuple(lay.names), numel=numel, norm=norm.copy(),
                max_abs=max_abs.copy(), nan=counts[:, 0], posinf=counts[:, 1], neginf=counts[:, 2],
                zero=counts[:, 3], total_norm=total_norm,
                clip_coef=clip, skipped=skip, histograms=counts[:, NUM_COUNTS:] if lay.bins else None, **extra,
            ))
        return records

"""The logger interface; the records it receives live in :mod:`fastgrad.records`.

A :class:`StepRecord` is one monitored optimizer step, already on the host
(numpy arrays, one entry per layer); a :class:`RunInfo` describes the run
once. Loggers receive records in step order, in batches of up to
``log_every`` steps (the monitor syncs with the device once per batch), and
never touch device tensors themselves.

The record types, :func:`encode_float` / :func:`decode_float` and
:func:`format_layers` are defined in :mod:`fastgrad.records` (shared with the
detectors) and re-exported here, where they have always been importable.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..records import (  # noqa: F401 (re-exported)
    SCHEMA_VERSION,
    Finding,
    RunInfo,
    StepRecord,
    decode_float,
    encode_float,
    format_layers,
)


class Logger:
    """Where a :class:`~fastgrad.GradMonitor` sends host-side records.

    Subclasses override what they support. Calls come in this order:
    :meth:`open` once, then :meth:`log_steps` / :meth:`log_findings` once per
    flush, :meth:`flush` after each, and :meth:`close` once. None of them
    sees a device tensor, so none of them can cause a device sync.
    """

    def open(self, info: RunInfo) -> None:
        self.info = info

    def log_steps(self, records: Sequence[StepRecord]) -> None:
        pass

    def log_findings(self, findings: Sequence[Finding]) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def health_scalars(r: StepRecord, layers: bool = True) -> list[tuple[str, float]]:
    """``(tag, value)`` scalars of the training-health quantities a record holds (schema 1.1):

    ``health/total_weight_norm``, ``health/total_update_norm``, ``health/total_update_ratio``,
    ``health/noise_scale`` (the flush's last record), and with ``layers`` per layer
    ``weight_norm/<layer>``, ``update_norm/<layer>``, ``update_ratio/<layer>``. Only what was
    measured appears, so a gradient-only run logs none of them.
    """
    out: list[tuple[str, float]] = []
    for tag, v in (("health/total_weight_norm", r.total_param_norm),
                   ("health/total_update_norm", r.total_update_norm),
                   ("health/total_update_ratio", r.total_update_ratio), ("health/noise_scale", r.noise_scale)):
        if v is not None:
            out.append((tag, float(v)))
    if layers:
        for prefix, col in (("weight_norm", r.param_norm), ("update_norm", r.update_norm),
                            ("update_ratio", r.update_ratio)):
            if col is not None:
                out += [(f"{prefix}/{name}", float(col[i])) for i, name in enumerate(r.layers)]
    return out


def trimmed_histogram(counts: np.ndarray, info: RunInfo) -> tuple[np.ndarray, np.ndarray] | None:
    """``(counts, log2 edges)`` cut to the non-empty bins, or None if all bins are empty.

    Histogram viewers (TensorBoard, W&B) scale their x-axis to the buckets they
    are given; 80 mostly empty binades would squash the data into a sliver.
    """
    nz = np.flatnonzero(counts)
    if nz.size == 0:
        return None
    lo, hi = int(nz[0]), int(nz[-1]) + 1
    return counts[lo:hi], info.log2_edges()[lo:hi + 1]

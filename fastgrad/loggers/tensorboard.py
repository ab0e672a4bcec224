"""TensorBoard logger through ``torch.utils.tensorboard.SummaryWriter`` (needs the ``tensorboard`` package).

Scalars (``global_step`` = the monitor's step):

* ``grad/global_norm``, ``grad/global_max_abs``, ``grad/nonfinite`` (elements),
  ``grad/zero_fraction``, and ``grad/clip_coef`` / ``grad/skipped`` when known;
* ``grad_norm/<layer>`` per layer (``layer_scalars=True``);
* training health, when measured (:func:`fastgrad.loggers.base.health_scalars`):
  ``health/total_weight_norm``, ``health/total_update_norm``, ``health/total_update_ratio``,
  ``health/noise_scale`` and per layer (``layer_scalars=True``) ``weight_norm/<layer>``,
  ``update_norm/<layer>``, ``update_ratio/<layer>``.

Histograms come straight from the fused pass's counts with
``add_histogram_raw`` — no tensor is copied to the host. The x-axis is
``log2 |g|``: bucket ``[e, e+1)`` holds ``2^e <= |g| < 2^(e+1)``; the
underflow and overflow bins are drawn one binade wide at the ends. Zeros,
NaN and Inf are not in the histogram (they are the scalars above). Tags:
``grad_log2_magnitude/global`` and, with ``layer_histograms=True``,
``grad_log2_magnitude/<layer>``. Buckets are cut to the non-empty range so
TensorBoard's axis fits the data. Findings go to the text tab
(``fastgrad/findings``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from .base import Logger, RunInfo, StepRecord, health_scalars, trimmed_histogram


class TensorBoardLogger(Logger):
    """Write to ``log_dir`` with a new ``SummaryWriter``, or to a ``writer`` you already have (not closed by us)."""

    def __init__(self, log_dir: str | os.PathLike | None = None, *, writer=None, layer_scalars: bool = True,
                 layer_histograms: bool = True):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # torch raises ImportError when the tensorboard package is missing
            raise ImportError("TensorBoardLogger needs the 'tensorboard' package: pip install tensorboard") from e
        if writer is None and log_dir is None:
            raise ValueError("TensorBoardLogger needs log_dir or writer")
        self._own = writer is None
        self.writer = writer if writer is not None else SummaryWriter(log_dir=os.fspath(log_dir))
        self.layer_scalars, self.layer_histograms = layer_scalars, layer_histograms

    def open(self, info: RunInfo) -> None:
        super().open(info)

    def _hist(self, tag: str, counts: np.ndarray, step: int) -> None:
        cut = trimmed_histogram(counts, self.info)
        if cut is None:
            return
        c, edges = cut
        centers = edges[:-1] + 0.5
        n = float(c.sum())
        self.writer.add_histogram_raw(
            tag, min=float(edges[0]), max=float(edges[-1]), num=n,
            sum=float((c * centers).sum()), sum_squares=float((c * centers**2).sum()),
            bucket_limits=edges[1:].tolist(), bucket_counts=c.astype(np.float64).tolist(), global_step=step,
        )

    def log_steps(self, records: Sequence[StepRecord]) -> None:
        w = self.writer
        for r in records:
            s = r.step
            w.add_scalar("grad/global_norm", r.total_norm, s)
            w.add_scalar("grad/global_max_abs", r.total_max_abs, s)
            w.add_scalar("grad/nonfinite", r.total_nonfinite, s)
            w.add_scalar("grad/zero_fraction", r.total_zero / max(r.total_numel, 1), s)
            if r.clip_coef is not None:
                w.add_scalar("grad/clip_coef", r.clip_coef, s)
            if r.skipped is not None:
                w.add_scalar("grad/skipped", float(r.skipped), s)
            if self.layer_scalars:
                for i, name in enumerate(r.layers):
                    w.add_scalar(f"grad_norm/{name}", float(r.norm[i]), s)
            for tag, v in health_scalars(r, self.layer_scalars):
                w.add_scalar(tag, v, s)
            if r.histograms is not None:
                self._hist("grad_log2_magnitude/global", r.global_histogram, s)
                if self.layer_histograms:
                    for i, name in enumerate(r.layers):
                        self._hist(f"grad_log2_magnitude/{name}", r.histograms[i], s)

    def log_findings(self, findings) -> None:
        for f in findings:
            self.writer.add_text("fastgrad/findings", f"**{f.kind}** (step {f.step}): {f.message}", f.step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        if self._own:
            self.writer.close()
        else:
            self.writer.flush()

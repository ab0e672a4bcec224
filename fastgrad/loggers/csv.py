"""CSV logger: long format, one row per (step, layer), plus a findings file.

``RUN_DIR/gradients.csv`` columns: ``step, layer, numel, norm, max_abs, nan,
posinf, neginf, zero, clip_coef, skipped`` (schema 1.0), then the training-health columns of
schema 1.1 (the JSONL keys of the same names, :mod:`fastgrad.loggers.jsonl`):

* ``param_norm``: ``||w||`` of the layer's weights (``GradMonitor(weights=True)``);
* ``grad_param_ratio``: ``norm / param_norm`` (``||g|| / ||w||``, IEEE division: a zero weight
  norm gives ``inf``); only with ``norm_type=2``, where ``norm`` is the L2 norm like ``param_norm``;
* ``update_norm``, ``update_ratio``: ``||w_after - w_before||`` and ``||Δw|| / ||w_before||`` of
  this step (``fastgrad.wrap(..., monitor=m, track_updates=True)``);
* ``noise_scale``: ``B_simple`` (``GradMonitor(noise_scale=...)``), on the ``<global>`` row of the
  last step of each flush (the value read at that flush).

A cell is empty where the value was not measured on that step, so a gradient-only run has five
empty trailing columns. Each step also has a row with ``layer = "<global>"`` (total norm, max,
counts, and the health columns over the whole model). ``RUN_DIR/findings.csv``:
``step, first_step, kind, layers (';'-joined), value, message``. Long format
keeps the columns fixed when layers differ between steps, and loads directly
into pandas (``pd.read_csv(...).pivot(index="step", columns="layer", values="norm")``).

``append=True`` on a file written before the health columns existed keeps that file's header:
its rows stay 11 columns wide (the health values are not written, with a warning once), so
the file stays rectangular.
"""

from __future__ import annotations

import csv
import math
import os
import warnings
from collections.abc import Sequence

from .base import Logger, RunInfo, StepRecord
from .files import Claim, make_dirs

BASE_COLUMNS = ["step", "layer", "numel", "norm", "max_abs", "nan", "posinf", "neginf", "zero", "clip_coef",
                "skipped"]
HEALTH_COLUMNS = ["param_norm", "grad_param_ratio", "update_norm", "update_ratio", "noise_scale"]
COLUMNS = BASE_COLUMNS + HEALTH_COLUMNS
FINDING_COLUMNS = ["step", "first_step", "kind", "layers", "value", "message"]


def _opt(x) -> str:
    return "" if x is None else repr(x) if isinstance(x, float) else str(x)


def _f(x) -> str:
    """A measured float as ``repr`` (``nan``/``inf`` as Python writes them), ``""`` if not measured."""
    return "" if x is None else repr(float(x))


def _ratio(g: float, w: float) -> float:
    """IEEE ``g / w`` (as :attr:`fastgrad.GradStats.grad_param_ratio`): ``inf`` for ``w == 0 < g``, ``nan`` for 0/0."""
    if w == 0:
        return math.nan if (g == 0 or math.isnan(g)) else math.copysign(math.inf, g)
    return g / w


def _existing_header(path: str) -> list[str] | None:
    try:
        with open(path, newline="") as fh:
            return next(csv.reader(fh), None)
    except OSError:
        return None


class CsvLogger(Logger):
    """Writes ``gradients.csv`` and ``findings.csv`` into ``run_dir`` (truncating them unless ``append=True``).

    :meth:`open` creates ``run_dir``, locks ``gradients.csv`` (``.gradients.csv.lock``,
    covering ``findings.csv`` too; see :mod:`fastgrad.loggers.files`) and opens it, so
    an unwritable destination or a second writer is an error there, before any step.
    """

    def __init__(self, run_dir: str | os.PathLike, *, append: bool = False):
        self.run_dir = os.fspath(run_dir)
        self.append = append
        self._fh = self._ffh = None
        self._claim: Claim | None = None

    def open(self, info: RunInfo) -> None:
        super().open(info)
        if self._claim is not None:
            return
        make_dirs(self.run_dir, "gradients.csv")
        path = os.path.join(self.run_dir, "gradients.csv")
        claim = Claim(self, path, "gradients.csv")
        try:
            fresh = not (self.append and os.path.exists(path))
            header = None if fresh else _existing_header(path)
            fresh = fresh or not header
            # appending to a file written with an older header keeps that header's columns
            self._columns = COLUMNS if fresh else [c for c in COLUMNS if c in header]
            self._dropped_warned = False
            self._fh = claim.open(path, "w" if fresh else "a", newline="")
            self._claim = claim
            self._w = csv.writer(self._fh)
            if fresh:
                self._w.writerow(COLUMNS)
        except BaseException:
            self._fh = self._claim = None
            claim.close()
            raise

    def _health(self, r: StepRecord, i: int | None) -> list[str]:
        """The five health cells of layer ``i`` (None: the ``<global>`` row)."""
        l2 = getattr(getattr(self, "info", None), "norm_type", 2.0) == 2.0
        if i is None:
            g, w = float(r.total_norm), r.total_param_norm
            u, q, ns = r.total_update_norm, r.total_update_ratio, r.noise_scale
        else:
            g = float(r.norm[i])
            w = None if r.param_norm is None else float(r.param_norm[i])
            u = None if r.update_norm is None else r.update_norm[i]
            q = None if r.update_ratio is None else r.update_ratio[i]
            ns = None
        ratio = _ratio(g, float(w)) if (w is not None and l2) else None
        return [_f(w), _f(ratio), _f(u), _f(q), _f(ns)]

    def _row(self, cells: list) -> list:
        if len(self._columns) == len(COLUMNS):
            return cells
        dropped = any(c != "" for c in cells[len(BASE_COLUMNS):])
        if dropped and not self._dropped_warned:
            self._dropped_warned = True
            warnings.warn(f"{os.path.join(self.run_dir, 'gradients.csv')} was written without the training-health "
                          f"columns ({', '.join(HEALTH_COLUMNS)}); appending keeps its header, so they are not "
                          "written to it (start a new file, or use the JSONL log)", RuntimeWarning, stacklevel=3)
        keep = dict(zip(COLUMNS, cells))
        return [keep[c] for c in self._columns]

    def log_steps(self, records: Sequence[StepRecord]) -> None:
        for r in records:
            clip, skip = _opt(r.clip_coef), _opt(r.skipped)
            self._w.writerow(self._row(
                [r.step, "<global>", r.total_numel, repr(float(r.total_norm)), repr(r.total_max_abs),
                 int(r.nan.sum()), int(r.posinf.sum()), int(r.neginf.sum()), r.total_zero, clip, skip,
                 *self._health(r, None)]))
            for i, name in enumerate(r.layers):
                self._w.writerow(self._row(
                    [r.step, name, int(r.numel[i]), repr(float(r.norm[i])), repr(float(r.max_abs[i])),
                     int(r.nan[i]), int(r.posinf[i]), int(r.neginf[i]), int(r.zero[i]), clip, skip,
                     *self._health(r, i)]))

    def log_findings(self, findings) -> None:
        if self._ffh is None:
            path = os.path.join(self.run_dir, "findings.csv")
            fresh = not (self.append and os.path.exists(path))
            self._ffh = self._claim.open(path, "w" if fresh else "a", newline="")
            self._fw = csv.writer(self._ffh)
            if fresh:
                self._fw.writerow(FINDING_COLUMNS)
        for f in findings:
            self._fw.writerow([f.step, f.first_step, f.kind, ";".join(f.layers), _opt(f.value), f.message])

    def flush(self) -> None:
        for fh in (self._fh, self._ffh):
            if fh is not None:
                fh.flush()

    def close(self) -> None:
        claim, self._claim = self._claim, None
        self._fh = self._ffh = None
        if claim is not None:
            claim.close()

    def __getstate__(self) -> dict:
        if self._claim is not None:
            raise TypeError(f"an open CsvLogger ({self.run_dir!r}) cannot be copied or pickled: it holds its files "
                            "and their lock; make a new logger")
        return self.__dict__.copy()

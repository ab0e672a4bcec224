"""CSV logger: long format, one row per (step, layer), plus a findings file.

``RUN_DIR/gradients.csv`` columns: ``step, layer, numel, norm, max_abs, nan,
posinf, neginf, zero, clip_coef, skipped``. Each step also has a row with
``layer = "<global>"`` (total norm, max, counts). ``RUN_DIR/findings.csv``:
``step, first_step, kind, layers (';'-joined), value, message``. Long format
keeps the columns fixed when layers differ between steps, and loads directly
into pandas (``pd.read_csv(...).pivot(index="step", columns="layer", values="norm")``).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence

from .base import Logger, RunInfo, StepRecord
from .files import Claim, make_dirs

COLUMNS = ["step", "layer", "numel", "norm", "max_abs", "nan", "posinf", "neginf", "zero", "clip_coef", "skipped"]
FINDING_COLUMNS = ["step", "first_step", "kind", "layers", "value", "message"]


def _opt(x) -> str:
    return "" if x is None else repr(x) if isinstance(x, float) else str(x)


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
            self._fh = claim.open(path, "w" if fresh else "a", newline="")
            self._claim = claim
            self._w = csv.writer(self._fh)
            if fresh:
                self._w.writerow(COLUMNS)
        except BaseException:
            self._fh = self._claim = None
            claim.close()
            raise

    def log_steps(self, records: Sequence[StepRecord]) -> None:
        for r in records:
            clip, skip = _opt(r.clip_coef), _opt(r.skipped)
            self._w.writerow([r.step, "<global>", r.total_numel, repr(float(r.total_norm)), repr(r.total_max_abs),
                              int(r.nan.sum()), int(r.posinf.sum()), int(r.neginf.sum()), r.total_zero, clip, skip])
            for i, name in enumerate(r.layers):
                self._w.writerow([r.step, name, int(r.numel[i]), repr(float(r.norm[i])), repr(float(r.max_abs[i])),
                                  int(r.nan[i]), int(r.posinf[i]), int(r.neginf[i]), int(r.zero[i]), clip, skip])

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

"""JSONL logger: one JSON object per line, the default format and the input of ``fastgrad report``.

File: ``RUN_DIR/gradients.jsonl``. Every line has a ``"type"``:

``"meta"`` (first line, once per monitor)::

    {"type": "meta", "schema": 1, "fastgrad_version": "0.1.0", "created": 1.7e9,
     "norm_type": 2.0, "hist_min_exp": -64, "hist_max_exp": 16,
     "every": 1, "histogram_every": 100, "log_every": 50, "max_norm": 1.0 | null,
     "model": "Sequential", "detectors": [{"kind": "vanishing", "relative": 0.001, ...}, ...]}

``"step"`` (one per monitored step)::

    {"type": "step", "step": 12, "time": 1.7e9,
     "total": {"norm": 0.83, "max_abs": 0.2, "numel": 12345, "nonfinite": 0, "zero": 3},
     "clip_coef": 0.5 | null, "skipped": false | null,
     "layers": {"<layer>": {"norm": .., "max_abs": .., "numel": .., "nan": .., "posinf": ..,
                            "neginf": .., "zero": ..}, ...},
     "histograms": {"<layer>": [count per bin, hist_max_exp - hist_min_exp + 2 bins]}}  # histogram steps only

    Bin 0 counts finite non-zero ``|g| < 2^hist_min_exp``, bin ``1 + e - hist_min_exp``
    counts ``2^e <= |g| < 2^(e+1)``, the last bin ``|g| >= 2^hist_max_exp``
    (:class:`fastgrad.HistogramSpec`); zeros, NaN and ±Inf are the layer's counters.

``"finding"`` (one per detector event, after the steps of the same flush)::

    {"type": "finding", "kind": "vanishing", "step": 30, "first_step": 21,
     "layers": ["0", "2"], "message": "...", "value": 3.1e-12}

Non-finite floats are the strings ``"nan"``, ``"inf"``, ``"-inf"`` (strict JSON).
Layers appear in model order. :func:`read_run` reads a file back.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from .base import Logger, RunInfo, StepRecord

FILENAME = "gradients.jsonl"


class JsonlLogger(Logger):
    """JSONL writer; ``path`` is a run directory (``gradients.jsonl`` inside) or a ``.jsonl`` file.

    A new logger truncates an existing file unless ``append=True`` (resuming a run:
    the steps continue after the first header, and :func:`read_run` keeps that header).
    """

    def __init__(self, path: str | os.PathLike, *, append: bool = False):
        path = os.fspath(path)
        self.path = path if path.endswith(".jsonl") else os.path.join(path, FILENAME)
        self.append = append
        self._fh = None

    def open(self, info: RunInfo) -> None:
        super().open(info)
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        self._fh = open(self.path, "a" if self.append else "w", encoding="utf-8")  # noqa: SIM115 (kept open)
        self._write({"type": "meta", **info.to_dict()})

    def _write(self, obj: dict) -> None:
        self._fh.write(json.dumps(obj, allow_nan=False, separators=(",", ":")) + "\n")

    def log_steps(self, records: Sequence[StepRecord]) -> None:
        for r in records:
            self._write(r.to_json())

    def log_findings(self, findings) -> None:
        for f in findings:
            self._write(f.to_json())

    def flush(self) -> None:
        if self._fh is not None:
            self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


@dataclass
class Run:
    """A run read back from JSONL: header, steps in file order, findings."""

    info: RunInfo
    steps: list[StepRecord] = field(default_factory=list)
    findings: list = field(default_factory=list)
    path: str = ""

    @property
    def layers(self) -> list[str]:
        """Every layer seen, in first-seen (model) order."""
        seen: dict[str, None] = {}
        for s in self.steps:
            for n in s.layers:
                seen.setdefault(n, None)
        return list(seen)


def read_run(path: str | os.PathLike) -> Run:
    """Read ``RUN_DIR/gradients.jsonl`` (or a ``.jsonl`` path). Raises FileNotFoundError / ValueError."""
    from ..detectors import Finding

    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, FILENAME)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no fastgrad run at {path!r} (expected a {FILENAME} written by GradMonitor)")
    run: Run | None = None
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not JSON ({e})") from None
            kind = obj.get("type")
            if kind == "meta":
                if run is None:  # a resumed run appends a second header: keep the first
                    run = Run(RunInfo.from_dict(obj), path=path)
            elif run is None:
                raise ValueError(f"{path}:{lineno}: {kind!r} line before the 'meta' header")
            elif kind == "step":
                run.steps.append(StepRecord.from_json(obj))
            elif kind == "finding":
                run.findings.append(Finding.from_json(obj))
    if run is None:
        raise ValueError(f"{path}: empty, no 'meta' header")
    return run

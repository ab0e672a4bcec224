"""JSONL logger: one JSON object per line, the default format and the input of ``fastgrad report``.

File: ``RUN_DIR/gradients.jsonl``. Every line has a ``"type"``:

``"meta"`` (first line, once per monitor)::

    {"type": "meta", "schema": 1, "schema_minor": 1, "fastgrad_version": "0.1.0", "created": 1.7e9,
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

Schema version: ``schema`` (major) changes only when an older reader would misread a file;
``schema_minor`` counts additive changes, whose keys older readers ignore. A meta line without
``schema_minor`` is 1.0 (files written before it) and reads the same.

- 1.0: the keys above.
- 1.1 (training health, each key present only when measured on that step):

  - per layer, in ``"layers"``: ``"param_norm"`` (``||w||`` of the layer's weights, from the
    same launch as the gradients: ``GradMonitor(weights=True)``), ``"update_norm"``
    (``||w_after - w_before||``) and ``"update_ratio"`` (``||Δw|| / ||w_before||``) of this
    step (``fastgrad.wrap(..., monitor=m, track_updates=True)``);
  - in ``"total"``: ``"param_norm"``, ``"update_norm"``, ``"update_ratio"`` over the whole model
    (the optimizer's tensors for the updates);
  - ``"noise_scale"``: the gradient noise scale ``B_simple`` (``GradMonitor(noise_scale=...)``),
    on the last step line of each flush (the value read at that flush).

  Example: ``"layers": {"h.0.mlp": {"norm": 0.1, ..., "param_norm": 12.3, "update_norm": 0.004,
  "update_ratio": 3.2e-4}}``, ``"total": {..., "update_ratio": 2.9e-4}``, ``"noise_scale": 812.0``.

``"finding"`` (one per detector event, after the steps of the same flush)::

    {"type": "finding", "kind": "vanishing", "step": 30, "first_step": 21,
     "layers": ["0", "2"], "message": "...", "value": 3.1e-12}

Non-finite floats are the strings ``"nan"``, ``"inf"``, ``"-inf"`` (strict JSON).
Layers appear in model order. :func:`read_run` reads a file back.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..records import Finding
from .base import Logger, RunInfo, StepRecord
from .files import Claim, make_dirs

FILENAME = "gradients.jsonl"


class JsonlLogger(Logger):
    """JSONL writer; ``path`` is a run directory (``gradients.jsonl`` inside) or a ``.jsonl`` file.

    A new logger truncates an existing file unless ``append=True`` (resuming a run:
    the steps continue after the first header, and :func:`read_run` keeps that header).

    :meth:`open` creates the directory, locks the file (``.gradients.jsonl.lock``
    beside it, see :mod:`fastgrad.loggers.files`) and opens it, so an unwritable
    destination or a second writer of the same file is an error there, before any
    step. The lock is released by :meth:`close` (or at interpreter exit). An open
    logger cannot be copied or pickled (TypeError).
    """

    def __init__(self, path: str | os.PathLike, *, append: bool = False):
        path = os.fspath(path)
        self.path = path if path.endswith(".jsonl") else os.path.join(path, FILENAME)
        self.append = append
        self._fh = None
        self._claim: Claim | None = None

    def open(self, info: RunInfo) -> None:
        super().open(info)
        if self._claim is not None:
            return
        make_dirs(os.path.dirname(self.path), FILENAME)
        claim = Claim(self, self.path, os.path.basename(self.path))
        try:
            self._fh = claim.open(self.path, "a" if self.append else "w")
            self._claim = claim
            self._write({"type": "meta", **info.to_dict()})
        except BaseException:
            self._fh = self._claim = None
            claim.close()
            raise

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
        claim, self._claim, self._fh = self._claim, None, None
        if claim is not None:
            claim.close()

    def __getstate__(self) -> dict:
        if self._claim is not None:
            raise TypeError(f"an open JsonlLogger ({self.path!r}) cannot be copied or pickled: it holds the file "
                            "and its lock; make a new logger (with another path, or append=True after close())")
        return self.__dict__.copy()


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
    """Read ``RUN_DIR/gradients.jsonl`` (or a ``.jsonl`` path). Raises FileNotFoundError / ValueError.

    A last line that is not complete JSON — the file was cut by a crash or a full
    disk mid-write — is skipped with a RuntimeWarning naming it; everything before
    it is read. Any other bad line (not JSON, JSON of the wrong shape such as
    ``[1, 2]``, a ``"step"`` without ``"layers"``) raises ValueError naming the
    file and line number. Lines of an unknown ``"type"`` are ignored (newer writers).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, FILENAME)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no fastgrad run at {path!r} (expected a {FILENAME} written by GradMonitor)")
    run: Run | None = None
    cut = None  # (line number, length, error) of an undecodable line: fine only if nothing follows it
    with open(path, encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            if cut is not None:
                raise ValueError(f"{path}:{cut[0]}: not JSON ({cut[2]}); the file is corrupted (two writers at "
                                 "once? a damaged copy?)")
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                cut = (lineno, len(line), e)
                continue
            run = _read_line(obj, run, path, lineno)
    if cut is not None:
        warnings.warn(f"{path}:{cut[0]}: the last line is incomplete ({cut[1]} characters, not complete JSON: "
                      f"{cut[2].msg}), as a crash or a full disk mid-write leaves it; skipped, the lines before "
                      "it are read", RuntimeWarning, stacklevel=2)
    if run is None:
        raise ValueError(f"{path}: empty, no 'meta' header")
    return run


def _bad(path: str, lineno: int, what: str) -> ValueError:
    return ValueError(f"{path}:{lineno}: {what}; not a line GradMonitor writes (is this a fastgrad run?)")


def _read_line(obj, run: Run | None, path: str, lineno: int) -> Run | None:
    """Add one decoded line to ``run`` (None before the header); ValueError naming the line if malformed."""
    if not isinstance(obj, dict):
        raise _bad(path, lineno, f"a JSON {type(obj).__name__}, expected an object with a 'type'")
    kind = obj.get("type")
    if kind == "meta":
        if run is not None:  # a resumed run appends a second header: keep the first
            return run
        try:
            info = RunInfo.from_dict(obj)
            for key in ("norm_type", "hist_min_exp", "hist_max_exp", "every", "histogram_every", "log_every"):
                v = getattr(info, key)
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise TypeError(f"{key!r} is {v!r}, not a number")
        except (TypeError, ValueError) as e:
            raise _bad(path, lineno, f"malformed 'meta' header ({e})") from None
        return Run(info, path=path)
    if kind not in ("step", "finding"):
        if not isinstance(kind, str):
            raise _bad(path, lineno, f"no 'type' string (got {kind!r})")
        return run  # a line type from a newer writer
    if run is None:
        raise ValueError(f"{path}:{lineno}: {kind!r} line before the 'meta' header")
    try:
        if kind == "step":
            if not isinstance(obj.get("layers"), dict):
                raise KeyError("layers") if "layers" not in obj else TypeError("'layers' is not an object")
            run.steps.append(StepRecord.from_json(obj))
        else:
            run.findings.append(Finding.from_json(obj))
    except KeyError as e:
        raise _bad(path, lineno, f"a {kind!r} line without {e.args[0]!r}") from None
    except (TypeError, ValueError, AttributeError) as e:
        raise _bad(path, lineno, f"malformed {kind!r} line ({type(e).__name__}: {e})") from None
    return run

"""GradMonitor: per-layer gradient health you can leave on for a whole run.

The monitor asks the fused statistics pass (:func:`fastgrad.grad_stats`) for
per-layer rows — norm, max ``|g|``, NaN/Inf/zero counts and, every
``histogram_every`` steps, the power-of-two magnitude histogram — and keeps
them **on the device**: each monitored step appends one small float64 vector
(a single ``torch.cat``, no ``.item()``). Every ``log_every`` monitored steps
(and on :meth:`GradMonitor.flush` / :meth:`GradMonitor.close`) the pending
vectors are concatenated and copied to the host in **one transfer**; only
then do the detectors (:mod:`fastgrad.detectors`) and the loggers
(:mod:`fastgrad.loggers`) run. The cost of the sync is amortised over
``log_every`` steps, and the statistics come from the same pass that clips
when the monitor is attached to ``fastgrad.wrap``.

Two ways to drive it:

* standalone: ``loss.backward(); monitor.step(); optimizer.step()``;
* through the optimizer wrapper: ``fastgrad.wrap(opt, max_norm=1.0, monitor=m)``
  calls :meth:`GradMonitor.stats_request` before its one ``grad_stats`` call
  and :meth:`GradMonitor.record` after it, so no second pass is made.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from .detectors import Detector, Finding, make_detectors
from .loggers.base import Logger, RunInfo, StepRecord, format_layers
from .spec import NUM_COUNTS, HistogramSpec, parse_norm_type
from .stats import GradStats, grad_stats, module_group

log = logging.getLogger("fastgrad.monitor")

LoggerArg = Logger | str

_BLOCK = re.compile(r"^(.*?\.?\d+)(?:\.|$)")


def block_group(name: str) -> str:
    """The repeated block owning a parameter: the prefix up to the first numeric component.

    ``transformer.h.3.attn.c_attn.weight`` -> ``transformer.h.3``; ``0.weight`` -> ``0``;
    names without a numeric component fall back to their owning module
    (``transformer.wte.weight`` -> ``transformer.wte``).
    """
    parts = name.split(".")
    for i, p in enumerate(parts[:-1]):
        if p.isdigit():
            return ".".join(parts[: i + 1])
    return module_group(name)


def _default_run_dir() -> str:
    return os.path.join("fastgrad_runs", time.strftime("%Y%m%d-%H%M%S"))


def _make_logger(spec: LoggerArg, run_dir: str) -> Logger:
    if isinstance(spec, Logger):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"loggers must hold Logger instances or names, got {type(spec).__name__}")
    if spec == "jsonl":
        from .loggers.jsonl import JsonlLogger
        return JsonlLogger(run_dir)
    if spec == "csv":
        from .loggers.csv import CsvLogger
        return CsvLogger(run_dir)
    if spec == "tensorboard":
        from .loggers.tensorboard import TensorBoardLogger
        return TensorBoardLogger(os.path.join(run_dir, "tensorboard"))
    if spec == "wandb":
        from .loggers.wandb import WandbLogger
        return WandbLogger(dir=run_dir)
    raise ValueError(f"unknown logger {spec!r}; use 'jsonl', 'csv', 'tensorboard', 'wandb' or a Logger")


class _Pending:
    """Host-side layout of one buffered step (the device vector holds the numbers)."""

    __slots__ = ("bins", "has_clip", "has_skip", "names", "step", "time")

    def __init__(self, step, t, names, bins, has_clip, has_skip):
        self.step, self.time, self.names, self.bins = step, t, names, bins
        self.has_clip, self.has_skip = has_clip, has_skip


_UNSET = object()
_GLOBAL = "<global>"


class GradMonitor:
    """Per-layer gradient statistics, kept on the device, synced and logged every ``log_every`` steps.

    Args:
        model: the ``torch.nn.Module`` (or an iterable of ``(name, parameter)`` pairs)
            whose gradients are watched; :meth:`step` reads their ``.grad``.
        every: monitor every ``every``-th optimizer step (the others cost nothing).
        histogram_every: add the magnitude histograms on steps that are multiples of
            this (a multiple of ``every``); 0 disables them.
        log_every: flush (one device->host copy, detectors, loggers) after this many
            monitored steps.
        groups: what a "layer" is: ``"module"`` (owning module, ``h.3.attn.c_attn``),
            ``"block"`` (up to the first numeric component, ``transformer.h.3``), an int
            depth, a callable ``name -> label`` or a mapping (see :func:`fastgrad.stats.group_labels`).
        loggers: :class:`~fastgrad.loggers.base.Logger` instances or the names
            ``"jsonl"``, ``"csv"``, ``"tensorboard"``, ``"wandb"`` (written under ``run_dir``).
        detectors: ``"default"`` (all four with documented thresholds), None, or
            :class:`~fastgrad.detectors.Detector` instances.
        run_dir: where named loggers write (default ``fastgrad_runs/<date-time>``).
        norm_type: the per-layer norm (2 by default).
        histogram_spec: the bins (default :class:`fastgrad.HistogramSpec`).
        max_norm: the clip threshold, if any, for the report's global-norm plot.
        history: how many flushed :class:`StepRecord` s to keep in :attr:`records`.
        backend: ``grad_stats`` backend for :meth:`step` (None = automatic).

    Nothing here synchronises with the device except :meth:`flush` (and what calls
    it: a step that fills the buffer, :meth:`close`, :meth:`summary`).
    """

    def __init__(
        self,
        model: torch.nn.Module | Iterable[tuple[str, torch.nn.Parameter]],
        *,
        every: int = 1,
        histogram_every: int = 100,
        log_every: int = 50,
        groups: str | int | Callable[[str], str] | Mapping[str, str] = "module",
        loggers: Sequence[LoggerArg] | LoggerArg | None = ("jsonl",),
        detectors: str | Detector | Sequence[Detector] | None = "default",
        run_dir: str | os.PathLike | None = None,
        norm_type: float | str = 2.0,
        histogram_spec: HistogramSpec | None = None,
        max_norm: float | None = None,
        history: int = 10_000,
        backend: str | None = None,
    ):
        self.model = model if isinstance(model, torch.nn.Module) else None
        if isinstance(model, torch.nn.Module):
            self._source: object = model
            model_name = type(model).__name__
        elif isinstance(model, (torch.Tensor, str)) or not isinstance(model, Iterable):
            raise TypeError("model must be a torch.nn.Module or an iterable of (name, parameter) pairs, "
                            f"got {type(model).__name__}")
        else:
            pairs = list(model)
            if not all(isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) for p in pairs):
                raise TypeError("model must be a torch.nn.Module or an iterable of (name, parameter) pairs")
            self._source = pairs
            model_name = "parameters"
        for name, v in (("every", every), ("log_every", log_every), ("history", history)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{name} must be an int, got {v!r}")
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if isinstance(histogram_every, bool) or not isinstance(histogram_every, int) or histogram_every < 0:
            raise ValueError(f"histogram_every must be an int >= 0 (0 = no histograms), got {histogram_every!r}")
        if histogram_every and histogram_every % every:
            raise ValueError(f"histogram_every ({histogram_every}) must be a multiple of every ({every}): "
                             "histograms are only taken on monitored steps")
        if histogram_spec is not None and not isinstance(histogram_spec, HistogramSpec):
            raise TypeError(f"histogram_spec must be a HistogramSpec, got {type(histogram_spec).__name__}")
        if max_norm is not None and not (isinstance(max_norm, (int, float)) and max_norm > 0):
            raise ValueError(f"max_norm must be a positive number or None, got {max_norm!r}")
        if groups == "block":
            self._groups: object = block_group
        elif groups is None:
            raise ValueError("groups=None: a monitor needs layers; use 'module', 'block', a depth or a callable")
        else:
            self._groups = groups
            if isinstance(groups, str) and groups != "module":
                raise ValueError(f"groups={groups!r}: use 'module', 'block', an int depth, a callable or a mapping")
        self.every, self.histogram_every, self.log_every = every, histogram_every, log_every
        self.norm_type = parse_norm_type(norm_type)
        self.histogram_spec = histogram_spec or HistogramSpec()
        self.max_norm = None if max_norm is None else float(max_norm)
        self.backend = backend
        self.detectors: list[Detector] = make_detectors(detectors)
        self.run_dir = os.fspath(run_dir) if run_dir is not None else None

        if loggers is None:
            loggers = ()
        elif isinstance(loggers, (str, Logger)):
            loggers = (loggers,)
        if any(isinstance(x, str) for x in loggers) and self.run_dir is None:
            self.run_dir = _default_run_dir()
        self.loggers: list[Logger] = [_make_logger(x, self.run_dir) for x in loggers]

        self.records: deque[StepRecord] = deque(maxlen=history)
        self.findings: list[Finding] = []
        self.info = RunInfo(
            norm_type=self.norm_type, hist_min_exp=self.histogram_spec.min_exp,
            hist_max_exp=self.histogram_spec.max_exp, every=every, histogram_every=histogram_every,
            log_every=log_every, max_norm=self.max_norm, model=model_name,
            detectors=[d.config() for d in self.detectors], fastgrad_version=_version(), created=time.time(),
        )
        self._opened = False
        self._closed = False
        self._step = 0
        self._pending_step: object = _UNSET
        self._pending_hist = False
        self._buf: list[torch.Tensor] = []
        self._layout: list[_Pending] = []
        # Running per-layer health for summary(): name -> [min, max] finite norm; name -> non-finite steps
        self._norm_range: dict[str, list[float]] = {}
        self._nonfinite_steps: dict[str, int] = {}

    # -- the wrapper contract ---------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def num_steps(self) -> int:
        """Optimizer steps seen so far (monitored or not)."""
        return self._step

    def stats_request(self) -> dict | None:
        """The extra ``grad_stats`` keyword arguments for the upcoming step, or None if it is not monitored.

        Call once per optimizer step, before its statistics pass; it advances the
        monitor's step counter. Never synchronises.
        """
        self._check_open()
        step = self._step
        self._step += 1
        if step % self.every:
            self._pending_step = None
            return None
        hist = bool(self.histogram_every) and step % self.histogram_every == 0
        self._pending_step, self._pending_hist = step, hist
        return {"groups": self._groups, "histogram": self.histogram_spec if hist else False,
                "norm_types": (self.norm_type,)}

    def record(self, stats: GradStats, *, clip_coef: torch.Tensor | float | None = None,
               skipped: torch.Tensor | bool | None = None) -> None:
        """Buffer one step's statistics on the device (no sync unless this fills the buffer).

        Args:
            stats: the step's :class:`~fastgrad.GradStats` (with ``groups`` rows when the
                request asked for them; per-tensor rows are used otherwise).
            clip_coef: the clip coefficient applied (0-d device tensor or float), if any.
            skipped: whether the optimizer step was skipped (0-d device tensor or bool), if any.

        Steps that :meth:`stats_request` declined are ignored. Called without a
        preceding :meth:`stats_request`, the record counts as the next step.
        """
        self._check_open()
        if not isinstance(stats, GradStats):
            raise TypeError(f"record() takes a GradStats, got {type(stats).__name__}")
        step = self._pending_step
        hist_wanted = self._pending_hist
        self._pending_step, self._pending_hist = _UNSET, False
        if step is None:  # not a monitored step
            return
        if step is _UNSET:
            step = self._step
            self._step += 1
            hist_wanted = True
        rows = stats.groups if stats.groups is not None else stats
        spec = rows.spec
        p = self.norm_type if self.norm_type in spec.norm_types else spec.norm_types[0]
        bins = 0
        if hist_wanted and spec.histogram is not None:
            if spec.histogram == self.histogram_spec:
                bins = spec.histogram.num_bins
            else:
                log.warning("fastgrad.GradMonitor: histogram bins %s differ from the monitor's %s; "
                            "histogram dropped", spec.histogram, self.histogram_spec)
        counts = rows.raw.counts if bins else rows.raw.counts[:, :NUM_COUNTS]
        f64 = torch.float64
        dev = rows.raw.floats.device
        parts = [rows.norm(p), rows.max_abs, rows.numel.to(f64), counts.to(f64).reshape(-1)]
        if clip_coef is not None:
            parts.append(torch.as_tensor(clip_coef, device=dev).to(f64).reshape(1))
        if skipped is not None:
            parts.append(torch.as_tensor(skipped, device=dev).to(f64).reshape(1))
        # One small copy per step: the backend may reuse its output buffers, and a
        # single contiguous vector per step makes the flush one cat + one transfer.
        self._buf.append(torch.cat(parts))
        self._layout.append(_Pending(step, time.time(), rows.names, bins, clip_coef is not None,
                                     skipped is not None))
        if len(self._buf) >= self.log_every:
            self.flush()

    def step(self) -> GradStats | None:
        """Standalone use, after ``backward()``: compute this step's statistics and record them.

        Returns the :class:`~fastgrad.GradStats` on monitored steps, None otherwise. Syncs
        only when the buffer fills (every ``log_every`` monitored steps).
        """
        req = self.stats_request()
        if req is None:
            return None
        stats = grad_stats(self._source, backend=self.backend, **req)
        self.record(stats)
        return stats

    # -- flushing -------------------------------------------------------------------
    def flush(self) -> list[StepRecord]:
        """Copy the buffered steps to the host (one transfer), run the detectors, write the loggers.

        Returns the new records. This is the monitor's only device sync.
        """
        self._check_open()
        if not self._opened:
            for lg in self.loggers:
                lg.open(self.info)
            self._opened = True
        if not self._buf:
            return []
        host = torch.cat(self._buf).to("cpu").numpy()
        layout = self._layout
        self._buf, self._layout = [], []
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
            clip = skip = None
            if lay.has_clip:
                clip = float(host[off])
                off += 1
            if lay.has_skip:
                skip = bool(host[off])
                off += 1
            rec = StepRecord(
                step=lay.step, time=lay.time, layers=tuple(lay.names), numel=numel, norm=norm.copy(),
                max_abs=max_abs.copy(), nan=counts[:, 0], posinf=counts[:, 1], neginf=counts[:, 2],
                zero=counts[:, 3], total_norm=_combine_norms(norm, self.norm_type),
                clip_coef=clip, skipped=skip, histograms=counts[:, NUM_COUNTS:] if lay.bins else None,
            )
            records.append(rec)
        new_findings: list[Finding] = []
        for rec in records:
            self._track(rec)
            for d in self.detectors:
                new_findings += d.update(rec)
        for f in new_findings:
            log.warning("fastgrad: %s", f.message)
        self.records.extend(records)
        self.findings += new_findings
        for lg in self.loggers:
            lg.log_steps(records)
            if new_findings:
                lg.log_findings(new_findings)
            lg.flush()
        return records

    def close(self) -> None:
        """Flush what is buffered and close the loggers. Idempotent."""
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._closed = True
            for lg in self.loggers:
                lg.close()

    def __enter__(self) -> GradMonitor:  # noqa: PYI034 (Python 3.10 has no typing.Self)
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this GradMonitor is closed")

    # -- reading back ---------------------------------------------------------------
    def _track(self, rec: StepRecord) -> None:
        for name, v, bad in [(_GLOBAL, rec.total_norm, rec.total_nonfinite)] + list(
                zip(rec.layers, rec.norm.tolist(), rec.nonfinite.tolist())):
            if math.isfinite(v):
                r = self._norm_range.setdefault(name, [v, v])
                r[0], r[1] = min(r[0], v), max(r[1], v)
            if bad:
                self._nonfinite_steps[name] = self._nonfinite_steps.get(name, 0) + 1

    def layer_status(self) -> dict[str, list[str]]:
        """Layer -> the detector conditions it is in now (``[]`` when healthy)."""
        out: dict[str, list[str]] = {}
        for d in self.detectors:
            for name in d.flagged():
                out.setdefault(name, []).append(d.kind)
        return out

    def summary(self, max_rows: int = 40) -> str:
        """A per-layer health table of the latest step, with each layer's norm range so far (flushes first)."""
        if not self._closed:
            self.flush()
        if not self.records:
            return "(no monitored steps yet)"
        rec = self.records[-1]
        status = self.layer_status()
        rms = rec.rms
        w = max(12, min(40, max(len(n) for n in rec.layers)))
        lines = [(f"{'layer':<{w}} {'numel':>9} {'grad norm':>10} {'rms':>9} {'norm range over run':>21} "
                 f"{'nonfin':>6}  status")]
        lo, hi = self._norm_range.get(_GLOBAL, [math.nan, math.nan])
        lines.append(f"{'(global)':<{w}} {rec.total_numel:>9d} {rec.total_norm:>10.2e} {'':>9} "
                     f"{lo:>10.1e}..{hi:<9.1e} {self._nonfinite_steps.get(_GLOBAL, 0):>6d}  "
                     f"latest step {rec.step}")
        for i, name in enumerate(rec.layers[:max_rows]):
            lo, hi = self._norm_range.get(name, [math.nan, math.nan])
            flags = status.get(name, [])
            lines.append(
                f"{name[:w]:<{w}} {int(rec.numel[i]):>9d} {rec.norm[i]:>10.2e} {rms[i]:>9.1e} "
                f"{lo:>10.1e}..{hi:<9.1e} {self._nonfinite_steps.get(name, 0):>6d}  "
                f"{', '.join(flags).upper() if flags else 'ok'}"
            )
        if len(rec.layers) > max_rows:
            lines.append(f"... {len(rec.layers) - max_rows} more layers")
        return "\n".join(lines)

    def findings_text(self) -> str:
        """The detectors' findings so far, one per line (no sync; call :meth:`flush` first for the latest)."""
        if not self.findings:
            return "no findings: no vanishing, exploding, non-finite or dead layers detected"
        return "\n".join(f"[{f.kind}] {f.message}" for f in self.findings)

    def __repr__(self) -> str:
        return (f"GradMonitor(every={self.every}, histogram_every={self.histogram_every}, "
                f"log_every={self.log_every}, steps={self._step}, loggers=[{format_layers([type(lg).__name__ for lg in self.loggers])}])")


def _combine_norms(norms: np.ndarray, p: float) -> float:
    """The norm of disjoint pieces from their norms (same scaled formula as :mod:`fastgrad.aggregate`)."""
    if norms.size == 0:
        return 0.0
    if np.isnan(norms).any():
        return math.nan
    m = float(norms.max())
    if m == 0 or math.isinf(m):
        return m
    if math.isinf(p):
        return m
    return m * float(np.sum((norms / m) ** p)) ** (1.0 / p)


def _version() -> str:
    from . import __version__
    return __version__

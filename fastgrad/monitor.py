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

Where each part lives: the settings are checked in :mod:`fastgrad.monitor_options`,
the device-side buffer is :mod:`fastgrad.monitor_buffer`, the loggers are built,
opened and isolated from each other's failures in :mod:`fastgrad.loggers.group`,
and the records they share with the detectors are in :mod:`fastgrad.records`.
This module ties them together and keeps the per-layer health for :meth:`GradMonitor.summary`.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch

from .detectors import Detector, Finding, make_detectors
from .loggers.base import Logger, RunInfo, StepRecord, format_layers
from .loggers.group import LoggerArg, LoggerFailure, LoggerGroup, logger_specs
from .loggers.group import default_run_dir as _default_run_dir  # noqa: F401 (former home)
from .loggers.group import make_logger as _make_logger  # noqa: F401 (former home)
from .monitor_buffer import StepBuffer
from .monitor_options import MonitorOptions, block_group
from .spec import HistogramSpec
from .stats import GradStats, grad_stats

__all__ = ["GradMonitor", "block_group"]

log = logging.getLogger("fastgrad.monitor")

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
        run_dir: where named loggers write (default: a new directory ``fastgrad_runs/<date-time>``,
            ``-2``, ``-3``... appended if that name is taken, so two monitors never share it).
        norm_type: the per-layer norm (2 by default).
        histogram_spec: the bins (default :class:`fastgrad.HistogramSpec`).
        max_norm: the clip threshold, if any, for the report's global-norm plot.
        history: how many flushed :class:`StepRecord` s to keep in :attr:`records`.
        backend: ``grad_stats`` backend for :meth:`step` (None = automatic).
        weights: also log each layer's weight norm ``||w||`` (and the total): the request asks
            ``grad_stats`` for ``params=True``, which reads the weights in the same launch as the
            gradients (one more read of the weights per monitored step, no extra launch).
        noise_scale: a :class:`fastgrad.NoiseScale` (fed by its accumulation, DDP or FSDP2
            hooks): its ``b_simple`` is read at each flush, in the flush's one transfer, and
            logged on the flush's last record (``noise_scale``).

    Update norms and ratios per layer are logged when the monitor is given them:
    ``fastgrad.wrap(opt, monitor=m, track_updates=True)`` (or ``attach``) measures each
    monitored step's update and passes it to :meth:`record` as ``updates=``.

    Nothing here synchronises with the device except :meth:`flush` (and what calls
    it: a step that fills the buffer, :meth:`close`, :meth:`summary`).

    Files, and what happens when they fail:

    * The loggers are opened here, at construction: an unwritable ``run_dir`` (a path
      under a regular file, a read-only or missing mount) raises OSError naming it,
      before any training step.
    * One writer per file: the JSONL and CSV loggers lock their file
      (``RUN_DIR/.gradients.jsonl.lock``: pid, host, command, start time). A second
      monitor on the same ``run_dir``, in this process or another, raises RuntimeError
      naming the first, and touches nothing; the lock is released by :meth:`close`
      (or at interpreter exit). A lock left by a process that died is taken over with
      a RuntimeWarning. With ``loggers=()`` nothing is written and nothing locked.
    * A logger that fails later (a full disk; a custom logger's bug) does not stop
      training: a RuntimeWarning names it once, it is closed and dropped, the other
      loggers and :attr:`records` go on. :meth:`close` warns again with the list,
      never raises for it, and :attr:`logger_failures` keeps it.

    Copies (``copy.deepcopy``, ``pickle``, e.g. of a ``fastgrad.wrap`` optimizer that
    carries this monitor) hold no open file and no lock: the copy keeps the settings,
    the step counter, the records, findings, detector state and buffered steps, but has
    no loggers (``loggers == []``, ``run_dir is None``) and writes nothing; it still
    records and flushes into :attr:`records`. To log a copied run to files, make a new
    GradMonitor with its own ``run_dir``.
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
        weights: bool = False,
        noise_scale=None,
    ):
        opts = MonitorOptions.from_args(
            model, every=every, histogram_every=histogram_every, log_every=log_every, groups=groups,
            norm_type=norm_type, histogram_spec=histogram_spec, max_norm=max_norm, history=history, backend=backend,
            weights=weights, noise_scale=noise_scale)
        self.detectors: list[Detector] = make_detectors(detectors)
        specs = logger_specs(loggers)
        self._set_options(opts)
        self.info = RunInfo(
            norm_type=self.norm_type, hist_min_exp=self.histogram_spec.min_exp,
            hist_max_exp=self.histogram_spec.max_exp, every=every, histogram_every=histogram_every,
            log_every=log_every, max_norm=self.max_norm, model=opts.model_name,
            detectors=[d.config() for d in self.detectors], fastgrad_version=_version(), created=time.time(),
        )
        # Last, once every argument is known good: open the loggers (errors for bad destinations here).
        self._loggers, run_dir = LoggerGroup.build(specs, None if run_dir is None else os.fspath(run_dir),
                                                   self.info)
        self.run_dir = run_dir
        self._reset_state(history)

    def _set_options(self, opts: MonitorOptions) -> None:
        self.model = opts.model
        self._source = opts.source
        self._groups = opts.groups
        self.every, self.histogram_every, self.log_every = opts.every, opts.histogram_every, opts.log_every
        self.norm_type = opts.norm_type
        self.histogram_spec = opts.histogram_spec
        self.max_norm = opts.max_norm
        self.backend = opts.backend
        self.weights = opts.weights
        self.noise_scale = opts.noise_scale

    def _reset_state(self, history: int) -> None:
        self.records: deque[StepRecord] = deque(maxlen=history)
        self.findings: list[Finding] = []
        self._closed = False
        self._step = 0
        self._pending_step: object = _UNSET
        self._pending_hist = False
        self._buffer = StepBuffer()
        self._update_segments: dict = {}  # (tensor names, layer names, device) -> Segments
        # Running per-layer health for summary(): name -> [min, max] finite norm; name -> non-finite steps
        self._norm_range: dict[str, list[float]] = {}
        self._nonfinite_steps: dict[str, int] = {}

    @property
    def loggers(self) -> list[Logger]:
        """The loggers still written to (opened at construction; a logger that failed is dropped)."""
        return self._loggers.active

    @property
    def logger_failures(self) -> list[LoggerFailure]:
        """Loggers that failed during the run (each warned once when it failed, and again on :meth:`close`)."""
        return list(self._loggers.failures)

    # -- copies ---------------------------------------------------------------------
    def __getstate__(self) -> dict:
        # Used by copy.deepcopy, copy.copy and pickle. A copy must not share or reopen the
        # original's files: two writers of one file is what the loggers' locks refuse.
        state = self.__dict__.copy()
        state["_loggers"] = LoggerGroup()
        state["run_dir"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

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
        req = {"groups": self._groups, "histogram": self.histogram_spec if hist else False,
               "norm_types": (self.norm_type,)}
        if self.weights:
            req["params"] = True
        return req

    def record(self, stats: GradStats, *, clip_coef: torch.Tensor | float | None = None,
               skipped: torch.Tensor | bool | None = None, updates=None) -> None:
        """Buffer one step's statistics on the device (no sync unless this fills the buffer).

        Args:
            stats: the step's :class:`~fastgrad.GradStats` (with ``groups`` rows when the
                request asked for them; per-tensor rows are used otherwise).
            clip_coef: the clip coefficient applied (0-d device tensor or float), if any.
            skipped: whether the optimizer step was skipped (0-d device tensor or bool), if any.
            updates: the step's :class:`fastgrad.UpdateStats`, if measured (a wrapper with
                ``track_updates=True`` passes it); its tensors are grouped into the monitor's
                layers on the device (``||Δw||`` combined as an L2 norm over the layer's tensors,
                the ratio over the layer's ``||w_before||``). Optional: monitors written before
                this keyword keep working, the wrapper only passes it to a ``record`` that takes it.

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
        weights = None
        if stats.params is not None:
            weights = (rows.param_norms, stats.total_param_norm)
        upd = None if updates is None else self._layer_updates(updates, rows.names, stats.groups is not None)
        self._buffer.append(step, rows, p, bins, clip_coef, skipped, weights, upd)
        if len(self._buffer) >= self.log_every:
            self.flush()

    def _layer_updates(self, updates, layers: tuple[str, ...], grouped: bool) -> tuple[torch.Tensor, ...]:
        """Per-layer ``||Δw||`` and ``||Δw|| / ||w_before||`` from the per-tensor rows of ``updates``,
        plus the totals: device ops only. Tensors outside the logged layers go to a dropped segment."""
        from . import aggregate
        from .stats import group_labels

        un = updates.update_norms
        key = (updates.names, layers, un.device)
        seg = self._update_segments.get(key)
        if seg is None:
            labels = group_labels(list(updates.names), self._groups) if grouped else list(updates.names)
            where = {n: i for i, n in enumerate(layers)}
            g = len(layers)
            seg = aggregate.Segments([where.get(lab, g) for lab in labels], g + 1, un.device)
            self._update_segments = {key: seg}  # one parameter set at a time
        g = len(layers)
        lu = aggregate.combine_norms(un, 2.0, seg)[:g]
        lw = aggregate.combine_norms(updates.param_norms, 2.0, seg)[:g]
        ratio = torch.where(lu == 0, torch.zeros_like(lu), lu / lw)
        return lu, ratio, updates.total_update_norm, updates.total_update_ratio

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
        tail = () if self.noise_scale is None or not len(self._buffer) else (self.noise_scale.b_simple,)
        records = self._buffer.drain(self.norm_type, tail)
        if not records:
            return []
        if tail:
            records[-1].noise_scale = float(self._buffer.tail_values[0])
        new_findings: list[Finding] = []
        for rec in records:
            self._track(rec)
            for d in self.detectors:
                new_findings += d.update(rec)
        for f in new_findings:
            log.warning("fastgrad: %s", f.message)
        self.records.extend(records)
        self.findings += new_findings
        self._loggers.write(records, new_findings)
        return records

    def close(self) -> None:
        """Flush what is buffered and close the loggers. Idempotent.

        Never raises for a logger: loggers that failed during the run, or fail to
        close, are listed in :attr:`logger_failures` and in a RuntimeWarning.
        """
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._closed = True
            self._loggers.close()

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


def _version() -> str:
    from . import __version__
    return __version__

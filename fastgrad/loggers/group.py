"""A monitor's loggers as one unit: built from names, opened together, isolated from each other's failures.

* :func:`make_logger` turns ``"jsonl"``, ``"csv"``, ``"tensorboard"``, ``"wandb"``
  into a logger writing under ``run_dir``; :class:`Logger` instances pass through.
* :meth:`LoggerGroup.open` opens every logger when the monitor is built, so a bad
  destination (a path under a regular file, a read-only directory, a file another
  monitor is writing) is an error at construction, before training starts; the
  loggers already opened are closed again.
* After that, a logger that raises while writing (a full disk, a lost network
  filesystem, a bug in a custom logger) does not stop training: the group warns
  once (RuntimeWarning), closes and drops that logger, keeps the others, and lists
  the failure in :attr:`LoggerGroup.failures`; :meth:`LoggerGroup.close` warns again
  with the list and never raises for a logger's failure.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from ..records import Finding, RunInfo, StepRecord
from .base import Logger
from .files import fresh_dir

LoggerArg = Logger | str
NAMED = ("jsonl", "csv", "tensorboard", "wandb")


def default_run_dir() -> str:
    """A new directory ``fastgrad_runs/<date-time>`` (``-2``, ``-3``... if taken), created now."""
    return fresh_dir(os.path.join("fastgrad_runs", time.strftime("%Y%m%d-%H%M%S")))


def make_logger(spec: LoggerArg, run_dir: str) -> Logger:
    """A :class:`Logger` for ``spec``: an instance as is, or a named logger writing under ``run_dir``."""
    if isinstance(spec, Logger):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"loggers must hold Logger instances or names, got {type(spec).__name__}")
    if spec == "jsonl":
        from .jsonl import JsonlLogger
        return JsonlLogger(run_dir)
    if spec == "csv":
        from .csv import CsvLogger
        return CsvLogger(run_dir)
    if spec == "tensorboard":
        from .tensorboard import TensorBoardLogger
        return TensorBoardLogger(os.path.join(run_dir, "tensorboard"))
    if spec == "wandb":
        from .wandb import WandbLogger
        return WandbLogger(dir=run_dir)
    raise ValueError(f"unknown logger {spec!r}; use 'jsonl', 'csv', 'tensorboard', 'wandb' or a Logger")


def logger_specs(loggers: Sequence[LoggerArg] | LoggerArg | None) -> tuple[LoggerArg, ...]:
    """``loggers`` as a tuple, checked (names known, instances are Loggers) before anything is built."""
    if loggers is None:
        return ()
    if isinstance(loggers, (str, Logger)):
        return (loggers,)
    specs = tuple(loggers)
    for x in specs:
        if isinstance(x, str) and x not in NAMED:
            raise ValueError(f"unknown logger {x!r}; use 'jsonl', 'csv', 'tensorboard', 'wandb' or a Logger")
        if not isinstance(x, (str, Logger)):
            raise TypeError(f"loggers must hold Logger instances or names, got {type(x).__name__}")
    return specs


def describe(lg: Logger) -> str:
    """``JsonlLogger ('runs/a/gradients.jsonl')``: a logger and its destination, for messages."""
    where = getattr(lg, "path", None) or getattr(lg, "run_dir", None)
    return f"{type(lg).__name__}" + (f" ({os.fspath(where)!r})" if where else "")


@dataclass
class LoggerFailure:
    """A logger that stopped: which, doing what, the exception, and the last step it was given."""

    logger: Logger
    action: str
    error: BaseException
    step: int | None

    def __str__(self) -> str:
        at = f" at step {self.step}" if self.step is not None else ""
        return f"{describe(self.logger)} failed {self.action}{at}: {type(self.error).__name__}: {self.error}"


class LoggerGroup:
    """The loggers of one monitor. :attr:`active` is the list still written to (the monitor's ``loggers``)."""

    def __init__(self, loggers: Sequence[Logger] = ()):
        self.active: list[Logger] = list(loggers)
        self.failures: list[LoggerFailure] = []

    @classmethod
    def build(cls, specs: Sequence[LoggerArg], run_dir: str | None, info: RunInfo) -> tuple[LoggerGroup, str | None]:
        """Make the loggers (``run_dir`` defaults to :func:`default_run_dir` when a named one needs it),
        open them all, and return the group with the run directory used.

        Raises what a logger's construction or ``open`` raises (OSError for an unwritable
        destination, RuntimeError for a file another monitor writes), after closing the
        loggers this call already opened.
        """
        if any(isinstance(x, str) for x in specs) and run_dir is None:
            run_dir = default_run_dir()
        group = cls()
        try:
            for spec in specs:
                lg = make_logger(spec, run_dir)
                lg.open(info)
                group.active.append(lg)
        except BaseException:
            for lg in group.active:
                try:
                    lg.close()
                except Exception:  # noqa: S110 - the original error is the one to report
                    pass
            raise
        return group, run_dir

    def write(self, records: Sequence[StepRecord], findings: Sequence[Finding]) -> None:
        """``log_steps``, ``log_findings`` (if any), ``flush`` on every active logger; a failing one is dropped."""
        for lg in list(self.active):
            try:
                lg.log_steps(records)
                if findings:
                    lg.log_findings(findings)
                lg.flush()
            except Exception as e:  # a logger must not stop training: see the module docstring
                self._drop(lg, "writing", e, records[0].step if records else None)

    def _drop(self, lg: Logger, action: str, e: BaseException, step: int | None) -> None:
        f = LoggerFailure(lg, action, e, step)
        self.failures.append(f)
        if lg in self.active:
            self.active.remove(lg)
        lost = f"records from step {step} on may be missing from it" if step is not None else "its output may be incomplete"
        warnings.warn(f"fastgrad.GradMonitor: {f}. Training goes on: this logger is closed and dropped ({lost}; "
                      f"monitor.records keeps them); the other {len(self.active)} logger(s) go on.",
                      RuntimeWarning, stacklevel=4)
        if action != "closing":
            try:
                lg.close()
            except Exception:  # noqa: S110 - already reported above
                pass

    def close(self) -> list[LoggerFailure]:
        """Close every active logger; never raises for a logger. Returns (and warns about) all failures of the run.

        The closed loggers stay in :attr:`active` (for ``repr`` and inspection); call once.
        """
        for lg in list(self.active):
            try:
                lg.close()
            except Exception as e:
                self._drop(lg, "closing", e, None)
        if self.failures:
            lines = "; ".join(str(f) for f in self.failures)
            warnings.warn(f"fastgrad.GradMonitor closed with {len(self.failures)} failed logger(s): {lines}. "
                          "Their output is incomplete; monitor.records and monitor.logger_failures have the "
                          "details.", RuntimeWarning, stacklevel=3)
        return list(self.failures)

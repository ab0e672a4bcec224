"""Lightning callback: a :class:`~fastgrad.GradMonitor` fed from ``on_before_optimizer_step``.

Lightning calls ``on_before_optimizer_step`` once per optimizer step, after
the backward passes of the step (all gradient-accumulation micro-batches,
gradients already unscaled under AMP) and *before* its own gradient clipping,
so the monitor sees the raw gradients the step is about to use::

    from fastgrad.integrations.lightning import FastgradCallback
    trainer = L.Trainer(callbacks=[FastgradCallback(histogram_every=50)])

Needs ``lightning`` (or the older ``pytorch_lightning``).
"""

from __future__ import annotations

from typing import Any

try:
    from lightning.pytorch import Callback
except ImportError:  # the pre-2.0 package name
    try:
        from pytorch_lightning import Callback
    except ImportError as e:
        raise ImportError("fastgrad.integrations.lightning needs lightning: pip install lightning") from e

from ..monitor import GradMonitor
from ._run_dir import default_run_dir


class FastgradCallback(Callback):
    """Monitor gradients during ``fit``.

    Args:
        monitor: a ready :class:`~fastgrad.GradMonitor` (its model should be the
            LightningModule); if None one is built at ``setup("fit")`` from ``monitor_kwargs``,
            writing to ``run_dir`` (default ``<trainer.log_dir or default_root_dir>/fastgrad``,
            ``.../fastgrad/rank<R>`` on ranks R > 0).
        **monitor_kwargs: :class:`~fastgrad.GradMonitor` keyword arguments.

    The monitor is closed (flushed) at the end of ``fit`` and on exceptions;
    :attr:`monitor` stays readable afterwards.
    """

    def __init__(self, monitor: GradMonitor | None = None, **monitor_kwargs: Any):
        super().__init__()
        if monitor is not None and monitor_kwargs:
            raise TypeError("pass either a GradMonitor or GradMonitor keyword arguments, not both")
        if monitor is not None and not isinstance(monitor, GradMonitor):
            raise TypeError(f"monitor must be a GradMonitor, got {type(monitor).__name__}")
        self.monitor = monitor
        self._kwargs = monitor_kwargs

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit" or self.monitor is not None:
            return
        kw = dict(self._kwargs)
        if kw.get("run_dir") is None:
            base = trainer.log_dir or trainer.default_root_dir or "."
            kw["run_dir"] = default_run_dir(base)
        self.monitor = GradMonitor(pl_module, **kw)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.monitor is not None and not self.monitor.closed:
            self.monitor.step()

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.monitor is not None:
            self.monitor.close()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if self.monitor is not None:
            self.monitor.close()

"""HuggingFace ``transformers`` callback: a :class:`~fastgrad.GradMonitor` fed from ``on_pre_optimizer_step``.

::

    from fastgrad.integrations.transformers import FastgradTrainerCallback
    trainer = Trainer(model, args, train_dataset=ds, callbacks=[FastgradTrainerCallback(groups="block")])

``Trainer`` calls ``on_pre_optimizer_step`` once per optimizer step, after
the accumulation micro-batches and **after** its own clipping at
``args.max_grad_norm`` (1.0 by default). The per-layer picture (which layers
vanish, go non-finite or die) is unaffected, but the global norm the monitor
records is the clipped one, so the exploding detector only sees what the
clipping let through. To watch the raw norms, set ``max_grad_norm=0`` — and,
to keep clipping, pass ``optimizers=(fastgrad.wrap(opt, max_norm=1.0,
model=model, monitor=m), scheduler)`` so clipping and monitoring share one
pass. The monitor's run directory defaults to ``<args.output_dir>/fastgrad``.

Needs ``transformers``.
"""

from __future__ import annotations

from typing import Any

try:
    from transformers import TrainerCallback
except ImportError as e:
    raise ImportError("fastgrad.integrations.transformers needs transformers: pip install transformers") from e

from ..monitor import GradMonitor
from ._run_dir import default_run_dir


class FastgradTrainerCallback(TrainerCallback):
    """Monitor gradients during ``Trainer.train()``.

    Args:
        monitor: a ready :class:`~fastgrad.GradMonitor` on the trainer's model; if None
            one is built at ``on_train_begin`` from ``monitor_kwargs``.
        **monitor_kwargs: :class:`~fastgrad.GradMonitor` keyword arguments.
    """

    def __init__(self, monitor: GradMonitor | None = None, **monitor_kwargs: Any):
        if monitor is not None and monitor_kwargs:
            raise TypeError("pass either a GradMonitor or GradMonitor keyword arguments, not both")
        if monitor is not None and not isinstance(monitor, GradMonitor):
            raise TypeError(f"monitor must be a GradMonitor, got {type(monitor).__name__}")
        self.monitor = monitor
        self._kwargs = monitor_kwargs

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.monitor is None:
            if model is None:
                raise RuntimeError("FastgradTrainerCallback: the Trainer passed no model to on_train_begin")
            kw = dict(self._kwargs)
            if kw.get("run_dir") is None:
                kw["run_dir"] = default_run_dir(args.output_dir or ".")
            self.monitor = GradMonitor(model, **kw)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.monitor is not None and not self.monitor.closed:
            self.monitor.step()

    def on_train_end(self, args, state, control, **kwargs):
        if self.monitor is not None:
            self.monitor.close()

"""Where :class:`~fastgrad.GradMonitor` writes: JSONL (default), CSV, TensorBoard, Weights & Biases.

The JSONL and CSV loggers need nothing beyond the standard library; the
TensorBoard and W&B loggers import their libraries only when constructed, so
``import fastgrad`` works without them.

File loggers lock the file they write (one writer per file, :mod:`.files`);
a monitor opens its loggers at construction and survives a logger that fails
later (:mod:`.group`).
"""

from .base import Logger, RunInfo, StepRecord
from .csv import CsvLogger
from .jsonl import JsonlLogger, Run, read_run

__all__ = ["CsvLogger", "JsonlLogger", "Logger", "Run", "RunInfo", "StepRecord", "TensorBoardLogger",
           "WandbLogger", "read_run"]


def __getattr__(name: str):
    # The optional-dependency loggers load on first use, not at import.
    if name == "TensorBoardLogger":
        from .tensorboard import TensorBoardLogger
        return TensorBoardLogger
    if name == "WandbLogger":
        from .wandb import WandbLogger
        return WandbLogger
    raise AttributeError(name)

"""Where a trainer callback's monitor writes by default."""

from __future__ import annotations

import os


def default_run_dir(base: str) -> str:
    """``<base>/fastgrad``, and ``<base>/fastgrad/rank<R>`` on ranks R > 0 of a distributed run.

    Every rank monitors (sharded statistics need every rank's collectives) and each
    writes its own files: one writer per run directory (a second one is refused), and
    pipeline stages log their own layers.
    """
    import torch.distributed as dist

    path = os.path.join(base, "fastgrad")
    if dist.is_available() and dist.is_initialized() and dist.get_rank() > 0:
        path = os.path.join(path, f"rank{dist.get_rank()}")
    return path

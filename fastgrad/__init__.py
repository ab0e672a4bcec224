"""fastgrad: see and control your gradients from one fused read.

Public API:
    grad_stats(...) -> GradStats      every statistic of a set of gradients
    clip_grad_norm_, clip_grad_value_, get_total_norm, clip_grads_with_norm_
                                      drop-in replacements for torch.nn.utils'
    HistogramSpec                     the power-of-two magnitude bins
    wrap, attach, detach, clip        clipping and step guarding folded into the optimizer step
    GradMonitor, Finding              per-layer monitoring, detectors, loggers (fastgrad.loggers)
    UpdateTracker, UpdateStats        per-layer update norms and update/weight ratios of a step
    NoiseScale                        the gradient noise scale B_simple (McCandlish et al. 2018)
    LayoutError                       a sharding layout the ranks disagree on (every rank raises it)
    available_backends()              which backends can run here, and why not
"""

from .clip_grad import clip_grad_norm_, clip_grad_value_, clip_grads_with_norm_, get_total_norm
from .spec import HistogramSpec, StatsSpec
from .stats import GradStats, grad_stats
from .backends import BACKEND_NAMES, get_backend
from .optim import wrap, attach, detach
from . import clip
from .monitor import GradMonitor
from .detectors import Finding
from .updates import UpdateStats, UpdateTracker
from .noise_scale import NoiseScale
from .dist_layout import LayoutError

from ._version import __version__  # pyproject.toml's version (fastgrad/_version.py)


def available_backends(device: str = "cpu", dtype=None) -> dict[str, str | None]:
    """``{backend: None if usable else the reason}`` for tensors of ``dtype`` on ``device``."""
    import torch

    dev = torch.device(device)
    dt = dtype or torch.float32
    return {name: get_backend(name).why_not(dev, dt) for name in BACKEND_NAMES}


__all__ = [
    "GradMonitor",
    "Finding",
    "LayoutError",
    "NoiseScale",
    "UpdateStats",
    "UpdateTracker",
    "GradStats",
    "HistogramSpec",
    "StatsSpec",
    "available_backends",
    "clip_grad_norm_",
    "clip_grad_value_",
    "clip_grads_with_norm_",
    "get_total_norm",
    "grad_stats",
    "wrap",
    "attach",
    "detach",
    "clip",
]

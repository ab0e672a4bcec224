"""GuardOptions: the arguments of :func:`fastgrad.wrap` and :func:`fastgrad.attach`, validated once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .. import clip as _clip
from ..spec import parse_norm_type
from .spike import SpikeSkip


@dataclass(frozen=True)
class GuardOptions:
    """What a wrapped or attached optimizer does each step (see :func:`fastgrad.wrap` for each).

    Built by :meth:`build`, which checks every argument and raises before anything is touched;
    ``max_norm`` and ``clip_value`` are resolved into ``clipper``, ``spike_skip=True`` into a
    :class:`SpikeSkip`, and ``model`` defaults to a monitor's module when it holds every parameter.
    """

    clipper: _clip.Clipper | None = None
    norm_type: float = 2.0
    skip_nonfinite: bool = True
    spike_skip: SpikeSkip | None = None
    model: torch.nn.Module | None = None
    monitor: Any = None
    backend: str | None = None
    process_group: Any = None
    placements: Any = None
    track_updates: bool = False

    @property
    def dist_kwargs(self) -> dict[str, Any]:
        """``process_group`` / ``placements`` for :func:`fastgrad.grad_stats`, when given."""
        return {k: v for k, v in (("process_group", self.process_group), ("placements", self.placements))
                if v is not None}

    @classmethod
    def build(cls, optimizer: Any, what: str, *, max_norm=None, norm_type=2.0, clip_value=None, clipper=None,
              skip_nonfinite=True, spike_skip=None, model=None, monitor=None, backend=None, process_group=None,
              placements=None, track_updates=False) -> GuardOptions:
        """Validate the arguments of ``what()`` (``"wrap"`` or ``"attach"``) for ``optimizer``."""
        check_optimizer(optimizer, what)
        given = [n for n, v in (("max_norm", max_norm), ("clip_value", clip_value), ("clipper", clipper))
                 if v is not None]
        if len(given) > 1:
            raise ValueError(
                f"{what}(): pass only one of max_norm, clip_value and clipper (got {', '.join(given)}): "
                "max_norm is clip.GlobalNorm(max_norm) and clip_value is clip.Value(clip_value); "
                "clamping elements and clipping the norm in one step is not offered"
            )
        p = parse_norm_type(norm_type)
        if max_norm is not None:
            clipper = _clip.GlobalNorm(max_norm)  # raises on negative / NaN
        elif clip_value is not None:
            clipper = _clip.Value(clip_value)
        elif not isinstance(clipper, (_clip.Clipper, type(None))):
            raise TypeError(f"clipper must be a fastgrad.clip.Clipper (e.g. clip.AutoClip()), got "
                            f"{type(clipper).__name__}")
        if not isinstance(skip_nonfinite, bool):
            raise TypeError(f"skip_nonfinite must be a bool, got {type(skip_nonfinite).__name__}")
        if spike_skip is True:
            spike_skip = SpikeSkip()
        elif spike_skip is False:
            spike_skip = None
        elif spike_skip is not None and not isinstance(spike_skip, SpikeSkip):
            raise TypeError(f"spike_skip must be a bool or a fastgrad.optim.SpikeSkip, got "
                            f"{type(spike_skip).__name__}")
        if monitor is not None and not (callable(getattr(monitor, "stats_request", None))
                                        and callable(getattr(monitor, "record", None))):
            raise TypeError("monitor must have stats_request() and record(stats, clip_coef=..., skipped=...) "
                            f"methods (e.g. fastgrad.GradMonitor), got {type(monitor).__name__}")
        if not isinstance(track_updates, bool):
            raise TypeError(f"track_updates must be a bool, got {type(track_updates).__name__}")
        model = _resolve_model(optimizer, model, monitor)
        return cls(clipper=clipper, norm_type=p, skip_nonfinite=skip_nonfinite, spike_skip=spike_skip, model=model,
                   monitor=monitor, backend=backend, process_group=process_group, placements=placements,
                   track_updates=track_updates)


def check_optimizer(optimizer: Any, what: str) -> None:
    """Refuse, with the reason, optimizers whose step cannot be clipped and guarded from outside."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"{what}() takes a torch.optim.Optimizer, got {type(optimizer).__name__}; build the optimizer "
            f"first, e.g. {what}(torch.optim.AdamW(model.parameters()), max_norm=1.0)"
        )
    if getattr(type(optimizer), "_fastgrad_wrapper", False) or hasattr(optimizer, "_fastgrad_attachment"):
        raise ValueError(f"{what}(): this optimizer is already wrapped or attached by fastgrad")
    if isinstance(optimizer, torch.optim.LBFGS):
        raise TypeError(
            f"{what}(): LBFGS re-evaluates its closure inside step(), so gradients cannot be clipped "
            "once before it; clip inside the closure instead (fastgrad.clip_grad_norm_)"
        )
    if isinstance(optimizer, torch.optim.SparseAdam):
        raise TypeError(
            f"{what}(): SparseAdam steps on sparse gradients (nn.Embedding(sparse=True)), and fastgrad's "
            "statistics pass, clipping and skip read dense gradients only; use a dense optimizer "
            "(e.g. torch.optim.Adam with sparse=False embeddings), or call SparseAdam without fastgrad"
        )


def _resolve_model(optimizer: torch.optim.Optimizer, model: Any, monitor: Any) -> torch.nn.Module | None:
    """The module that names the parameters: ``model``, else a monitor's module when it holds
    every parameter of the optimizer; checked to hold every parameter."""
    if model is None and isinstance(getattr(monitor, "model", None), torch.nn.Module):
        known = {id(q) for q in monitor.model.parameters()}
        if all(id(q) in known for g in optimizer.param_groups for q in g["params"]):
            model = monitor.model
    if model is None:
        return None
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    names = {id(q) for q in model.parameters()}
    opt_params = [q for g in optimizer.param_groups for q in g["params"]]
    foreign = [i for i, q in enumerate(opt_params) if id(q) not in names]
    if foreign:
        raise ValueError(
            f"{len(foreign)} of the optimizer's {len(opt_params)} parameters are not parameters of "
            f"model (first at flat index {foreign[0]}, shape {tuple(opt_params[foreign[0]].shape)}); "
            "pass the module the optimizer was built from, or model=None"
        )
    return model

"""GradMonitor's settings, checked once: what is watched, how often, which layers, which norm and bins.

:meth:`MonitorOptions.from_args` takes :class:`~fastgrad.GradMonitor`'s keyword
arguments and raises TypeError / ValueError saying what is wrong, before the
monitor opens any file.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch

from .spec import HistogramSpec, parse_norm_type
from .stats import module_group


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


def _count(name: str, v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int, got {v!r}")
    if v < 1:
        raise ValueError(f"{name} must be >= 1, got {v}")
    return v


@dataclass(frozen=True)
class MonitorOptions:
    """The checked settings of one :class:`~fastgrad.GradMonitor` (see its docstring for each)."""

    source: object  # the Module, or the list of (name, parameter) pairs, handed to grad_stats
    model: torch.nn.Module | None
    model_name: str
    every: int
    histogram_every: int
    log_every: int
    history: int
    groups: object  # what grad_stats(groups=...) gets: "module", a depth, a callable or a mapping
    norm_type: float
    histogram_spec: HistogramSpec
    max_norm: float | None
    backend: str | None
    weights: bool = False  # ask grad_stats for params=True on monitored steps
    noise_scale: object = None  # a fastgrad.NoiseScale read at each flush

    @classmethod
    def from_args(
        cls,
        model: torch.nn.Module | Iterable[tuple[str, torch.nn.Parameter]],
        *,
        every: int = 1,
        histogram_every: int = 100,
        log_every: int = 50,
        groups: str | int | Callable[[str], str] | Mapping[str, str] = "module",
        norm_type: float | str = 2.0,
        histogram_spec: HistogramSpec | None = None,
        max_norm: float | None = None,
        history: int = 10_000,
        backend: str | None = None,
        weights: bool = False,
        noise_scale: object = None,
    ) -> MonitorOptions:
        if isinstance(model, torch.nn.Module):
            source: object = model
            model_name = type(model).__name__
        elif isinstance(model, (torch.Tensor, str)) or not isinstance(model, Iterable):
            raise TypeError("model must be a torch.nn.Module or an iterable of (name, parameter) pairs, "
                            f"got {type(model).__name__}")
        else:
            pairs = list(model)
            if not all(isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) for p in pairs):
                raise TypeError("model must be a torch.nn.Module or an iterable of (name, parameter) pairs")
            source, model_name = pairs, "parameters"
        every, log_every, history = _count("every", every), _count("log_every", log_every), _count("history", history)
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
            groups = block_group
        elif groups is None:
            raise ValueError("groups=None: a monitor needs layers; use 'module', 'block', a depth or a callable")
        elif isinstance(groups, str) and groups != "module":
            raise ValueError(f"groups={groups!r}: use 'module', 'block', an int depth, a callable or a mapping")
        if not isinstance(weights, bool):
            raise TypeError(f"weights must be a bool, got {type(weights).__name__}")
        if noise_scale is not None:
            from .noise_scale import NoiseScale

            if not isinstance(noise_scale, NoiseScale):
                raise TypeError(f"noise_scale must be a fastgrad.NoiseScale (fed by its accumulation, DDP or "
                                f"FSDP hooks), got {type(noise_scale).__name__}")
        return cls(
            weights=weights, noise_scale=noise_scale,
            source=source, model=model if isinstance(model, torch.nn.Module) else None, model_name=model_name,
            every=every, histogram_every=histogram_every, log_every=log_every, history=history, groups=groups,
            norm_type=parse_norm_type(norm_type), histogram_spec=histogram_spec or HistogramSpec(),
            max_norm=None if max_norm is None else float(max_norm), backend=backend,
        )

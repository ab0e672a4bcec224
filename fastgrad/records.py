"""The host-side data a :class:`~fastgrad.GradMonitor` produces: step records, the run header, findings.

A :class:`StepRecord` is one monitored optimizer step, already on the host
(numpy arrays, one entry per layer); a :class:`RunInfo` describes the run
once; a :class:`Finding` is one detector event. Detectors
(:mod:`fastgrad.detectors`) make findings from records; loggers
(:mod:`fastgrad.loggers`) write all three. This module imports neither, so
both can import it (they used to import each other).

Encoding for text formats: non-finite floats are written as the strings
``"nan"``, ``"inf"`` and ``"-inf"`` (standard JSON has no NaN), and read back
by :func:`decode_float`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

__all__ = ["SCHEMA_MINOR", "SCHEMA_VERSION", "Finding", "RunInfo", "StepRecord", "decode_float", "encode_float", "format_layers"]

# The JSONL schema (fastgrad.loggers.jsonl): ``schema`` is the compatibility version, raised only
# by a change an older reader would misread; ``schema_minor`` counts additive changes (new optional
# keys that older readers ignore). 1.0: gradients; 1.1: weight norms, update norms and ratios per
# layer and in total, the gradient noise scale. A file without ``schema_minor`` is 1.0.
SCHEMA_VERSION = 1
SCHEMA_MINOR = 1


def encode_float(x: float | None) -> float | str | None:
    """A float as JSON allows it: finite floats as is, NaN/±Inf as ``"nan"``/``"inf"``/``"-inf"``."""
    if x is None:
        return None
    x = float(x)
    if math.isfinite(x):
        return x
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")


def decode_float(x: Any) -> float | None:
    """Inverse of :func:`encode_float`."""
    if x is None:
        return None
    return float(x)  # float("nan"), float("inf"), float("-inf") parse the strings


@dataclass
class RunInfo:
    """What a run's records mean: written once, first, by every logger that has a header."""

    norm_type: float = 2.0
    hist_min_exp: int = -64
    hist_max_exp: int = 16
    every: int = 1
    histogram_every: int = 100
    log_every: int = 50
    max_norm: float | None = None
    model: str = ""
    detectors: list[dict] = field(default_factory=list)
    fastgrad_version: str = ""
    created: float = 0.0
    schema: int = SCHEMA_VERSION
    schema_minor: int = SCHEMA_MINOR

    @property
    def num_bins(self) -> int:
        return self.hist_max_exp - self.hist_min_exp + 2

    def log2_edges(self) -> np.ndarray:
        """``num_bins + 1`` edges in log2-magnitude space.

        Bin ``0`` (underflow, ``|x| < 2^min_exp``) is drawn as ``[min_exp - 1, min_exp)``
        and the overflow bin as ``[max_exp, max_exp + 1)``: one binade each, so plots
        and histogram viewers get finite edges.
        """
        return np.arange(self.hist_min_exp - 1, self.hist_max_exp + 2, dtype=np.float64)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["max_norm"] = encode_float(self.max_norm)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> RunInfo:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        known["max_norm"] = decode_float(known.get("max_norm"))
        known.setdefault("schema_minor", 0)  # written before the minor version existed: 1.0
        return cls(**known)


@dataclass
class StepRecord:
    """One monitored step on the host. Arrays have one entry per layer (``layers`` order).

    Attributes:
        step: the monitor's optimizer-step counter (0-based).
        time: wall-clock seconds (``time.time()``) when the step was recorded.
        layers: layer (group) names.
        numel, norm, max_abs, nan, posinf, neginf, zero: per-layer element count,
            ``norm_type``-norm, max ``|g|``, NaN/+Inf/-Inf/zero element counts.
        total_norm: the global norm over all layers.
        clip_coef: the clip coefficient applied this step (``<= 1``), None if unknown.
        skipped: whether the optimizer step was skipped, None if unknown.
        histograms: int64 ``[layers, bins]`` power-of-two magnitude histograms
            (see :class:`fastgrad.HistogramSpec`) on histogram steps, else None.
        param_norm: float64 per-layer L2 norm of the weights ``||w||`` (same launch as the
            gradients, ``grad_stats(..., params=True)``), None when not measured.
        update_norm, update_ratio: float64 per-layer ``||w_after - w_before||`` and
            ``||Δw|| / ||w_before||`` of this step (``fastgrad.wrap(..., track_updates=True)``),
            None when not measured. A layer none of whose tensors the optimizer holds gets 0.
        total_param_norm, total_update_norm, total_update_ratio: the same over the whole model
            (the optimizer's tensors for the updates), None when not measured.
        noise_scale: the gradient noise scale ``B_simple`` (:class:`fastgrad.NoiseScale`) read at
            the flush that wrote this record (the last record of each flush), else None.
    """

    step: int
    time: float
    layers: tuple[str, ...]
    numel: np.ndarray
    norm: np.ndarray
    max_abs: np.ndarray
    nan: np.ndarray
    posinf: np.ndarray
    neginf: np.ndarray
    zero: np.ndarray
    total_norm: float
    clip_coef: float | None = None
    skipped: bool | None = None
    histograms: np.ndarray | None = None
    param_norm: np.ndarray | None = None
    update_norm: np.ndarray | None = None
    update_ratio: np.ndarray | None = None
    total_param_norm: float | None = None
    total_update_norm: float | None = None
    total_update_ratio: float | None = None
    noise_scale: float | None = None

    # -- derived ---------------------------------------------------------------
    @property
    def nonfinite(self) -> np.ndarray:
        return self.nan + self.posinf + self.neginf

    @property
    def rms(self) -> np.ndarray:
        """Per-layer root-mean-square gradient (2-norm only): ``norm / sqrt(numel)``, comparable across layer sizes."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return self.norm / np.sqrt(np.maximum(self.numel, 1))

    @property
    def total_max_abs(self) -> float:
        return float(self.max_abs.max()) if self.max_abs.size else 0.0

    @property
    def total_nonfinite(self) -> int:
        return int(self.nonfinite.sum())

    @property
    def total_zero(self) -> int:
        return int(self.zero.sum())

    @property
    def total_numel(self) -> int:
        return int(self.numel.sum())

    @property
    def clipped(self) -> bool | None:
        """True when a clip coefficient below 1 was applied (None if unknown)."""
        return None if self.clip_coef is None else bool(self.clip_coef < 1.0)

    @property
    def global_histogram(self) -> np.ndarray | None:
        return None if self.histograms is None else self.histograms.sum(axis=0)

    # -- JSON --------------------------------------------------------------------
    def to_json(self) -> dict:
        """The JSONL ``"step"`` object (schema in :mod:`fastgrad.loggers.jsonl`)."""
        layers = {}
        for i, name in enumerate(self.layers):
            layers[name] = {
                "norm": encode_float(self.norm[i]),
                "max_abs": encode_float(self.max_abs[i]),
                "numel": int(self.numel[i]),
                "nan": int(self.nan[i]),
                "posinf": int(self.posinf[i]),
                "neginf": int(self.neginf[i]),
                "zero": int(self.zero[i]),
            }
            for key, col in (("param_norm", self.param_norm), ("update_norm", self.update_norm),
                             ("update_ratio", self.update_ratio)):
                if col is not None:
                    layers[name][key] = encode_float(col[i])
        out: dict = {
            "type": "step",
            "step": self.step,
            "time": self.time,
            "total": {
                "norm": encode_float(self.total_norm),
                "max_abs": encode_float(self.total_max_abs),
                "numel": self.total_numel,
                "nonfinite": self.total_nonfinite,
                "zero": self.total_zero,
            },
            "clip_coef": encode_float(self.clip_coef),
            "skipped": self.skipped,
            "layers": layers,
        }
        for key in ("param_norm", "update_norm", "update_ratio"):
            v = getattr(self, "total_" + key)
            if v is not None:
                out["total"][key] = encode_float(v)
        if self.noise_scale is not None:
            out["noise_scale"] = encode_float(self.noise_scale)
        if self.histograms is not None:
            out["histograms"] = {name: self.histograms[i].tolist() for i, name in enumerate(self.layers)}
        return out

    @classmethod
    def from_json(cls, d: dict) -> StepRecord:
        layers = tuple(d["layers"])
        rows = [d["layers"][n] for n in layers]

        def col(key: str, dtype) -> np.ndarray:
            if dtype is np.float64:
                return np.array([decode_float(r[key]) for r in rows], dtype=np.float64)
            return np.array([r[key] for r in rows], dtype=dtype)

        def opt_col(key: str) -> np.ndarray | None:  # schema 1.1 keys: absent in 1.0 files
            if not rows or any(key not in r for r in rows):
                return None
            return col(key, np.float64)

        total = d["total"]
        hist = None
        if d.get("histograms") is not None:
            hist = np.array([d["histograms"][n] for n in layers], dtype=np.int64)
        return cls(
            step=int(d["step"]), time=float(d.get("time", 0.0)), layers=layers,
            numel=col("numel", np.int64), norm=col("norm", np.float64),
            max_abs=col("max_abs", np.float64), nan=col("nan", np.int64),
            posinf=col("posinf", np.int64), neginf=col("neginf", np.int64),
            zero=col("zero", np.int64), total_norm=decode_float(d["total"]["norm"]),
            clip_coef=decode_float(d.get("clip_coef")), skipped=d.get("skipped"), histograms=hist,
            param_norm=opt_col("param_norm"), update_norm=opt_col("update_norm"),
            update_ratio=opt_col("update_ratio"), total_param_norm=decode_float(total.get("param_norm")),
            total_update_norm=decode_float(total.get("update_norm")),
            total_update_ratio=decode_float(total.get("update_ratio")),
            noise_scale=decode_float(d.get("noise_scale")),
        )


@dataclass(frozen=True)
class Finding:
    """One detector event.

    Attributes:
        kind: ``"vanishing"``, ``"exploding"``, ``"nonfinite"``, ``"dead"`` or ``"update_spike"``.
        step: the monitored step at which the detector fired.
        first_step: the step at which the condition began (``step - patience + 1`` style).
        layers: the layers concerned, in model order (``("<global>",)`` for the global norm).
        message: one readable sentence naming layers and steps.
        value: the key number (an RMS, a norm, a count), when there is one.
    """

    kind: str
    step: int
    first_step: int
    layers: tuple[str, ...]
    message: str
    value: float | None = None

    def to_json(self) -> dict:
        d = asdict(self)
        d["layers"] = list(self.layers)
        d["value"] = encode_float(self.value)
        return {"type": "finding", **d}

    @classmethod
    def from_json(cls, d: dict) -> Finding:
        return cls(kind=d["kind"], step=int(d["step"]), first_step=int(d["first_step"]),
                   layers=tuple(d["layers"]), message=d["message"], value=decode_float(d.get("value")))

    def __str__(self) -> str:
        return self.message


def format_layers(layers: Sequence[str], limit: int = 6) -> str:
    """``a, b, c and 4 more``: layer lists for messages."""
    layers = list(layers)
    head = ", ".join(layers[:limit])
    return head if len(layers) <= limit else f"{head} and {len(layers) - limit} more"

"""Gradient clippers for :func:`fastgrad.wrap` / :func:`fastgrad.attach`: state on the device, no host sync.

Every clipper sees the statistics of the one fused read that
:func:`fastgrad.grad_stats` makes per step (global and per-tensor norms of the
*unscaled* gradients, AMP scale already divided out), and either returns one
global coefficient, which the optimizer integration folds into the fused
optimizer's ``grad_scale`` (no pass of its own) or applies in one scaling pass,
or scales the gradients itself (per-tensor, element-wise and unit-wise rules).

Notation: ``g`` is the gradient of one step, ``n = ||g||_p`` the global norm
of all gradients as one vector (``p = norm_type`` of the wrapper, 2 by
default), ``n_i`` the norm of tensor ``i``, ``c`` the coefficient applied,
``g <- c * g``. ``eps_t = 1e-6`` is torch's ``clip_grad_norm_`` constant.

``GlobalNorm(max_norm)`` (torch's ``clip_grad_norm_``)::

    c = min(max_norm / (n + eps_t), 1)

``PerTensorNorm(max_norm)`` (Keras ``clipnorm``, TF ``clip_by_norm`` per tensor)::

    c_i = max_norm / max(n_i, max_norm)          (c_i = 0 when max_norm = 0)

``Value(clip_value)`` (torch's ``clip_grad_value_``, Keras ``clipvalue``)::

    g <- clamp(g, -clip_value, clip_value)       element-wise, NaN stays NaN

``AutoClip(percentile=10, history=1000)`` (Seetharaman et al. 2020, "AutoClip:
Adaptive Gradient Clipping for Source Separation Networks"): append ``n`` to
the history ``H`` (the last ``history`` norms), then::

    t = percentile(H, percentile)                linear interpolation, as numpy
    c = min(t / (n + eps_t), 1)

``ZClip(alpha=0.97, z_thresh=2.5, warmup=25)`` (Kumar et al. 2025, "ZClip:
Adaptive Spike Mitigation for LLM Pre-Training", z-score mode with adaptive
scaling, as the authors' reference code): the first ``warmup`` norms are only
collected, then ``mu`` = their mean and ``v`` = their (population) variance.
Afterwards, with ``s = sqrt(v)``::

    z = (n - mu) / (s + eps)
    t = mu + z_thresh * s / (z / z_thresh)  if z > z_thresh   (adaptive)
        mu                                  if z > z_thresh   (mode="mean")
        n                                   otherwise
    t = min(t, max_norm)                    if max_norm is given
    c = t / (n + eps_t) if n > t else 1
    mu <- alpha * mu + (1 - alpha) * x,  v <- alpha * v + (1 - alpha) * (x - mu)^2

where ``x`` is ``t`` before the ``max_norm`` cap on a spike and ``n``
otherwise (the EMA is fed the clipped norm), and the variance update uses the
new ``mu``. During warm-up ``c = min(max_norm / (n + eps_t), 1)`` if
``max_norm`` is given, else 1.

``AGC(clip_factor=0.01, eps=1e-3)`` (Brock et al. 2021, "High-Performance
Large-Scale Image Recognition Without Normalization", NFNets): for every unit
``u`` (a row of a weight, see below) with parameter ``W_u`` and gradient ``G_u``::

    m_u = clip_factor * max(||W_u||_F, eps)
    G_u <- G_u * m_u / max(||G_u||_F, 1e-6)   if ||G_u||_F > m_u, else unchanged

Units, in PyTorch's weight layouts: a tensor of dim >= 2 has one unit per
index of dim 0, the norm taken over all other dims. That is one output
neuron of ``nn.Linear`` (``[out, in]``), one output channel of ``nn.ConvNd``
(``[out, in/groups, *kernel]``), one token's vector of ``nn.Embedding``
(``[num_embeddings, dim]``). Tensors of dim <= 1 (biases, norm gains,
scalars) are one unit. ``nn.ConvTransposeNd`` stores ``[in, out/groups, ...]``
and so is normalised per input channel, as timm and the NFNets code do.
The paper leaves the final classifier layer unclipped: pass its parameter
names in ``exclude``.

State (AutoClip's history, ZClip's EMA) lives on the gradients' device, is
updated with tensor ops only, advances only on steps that are applied and
finite (a skipped step leaves it unchanged), and round-trips through
``state_dict()`` / ``load_state_dict()``, and through the wrapping
optimizer's ``state_dict()``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .ops import clamp_op_, scale_op_

EPS = 1e-6  # torch's clip_grad_norm_: c = max_norm / (total_norm + 1e-6)


def _check_nonneg(value: float, what: str, *, positive: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{what} must be a number, got {type(value).__name__}") from None
    if math.isnan(v) or v < 0 or (positive and v == 0):
        need = "> 0" if positive else ">= 0"
        raise ValueError(f"{what} must be {need}, got {value!r}")
    return v


@dataclass
class ClipContext:
    """What a clipper is given each step (built by the optimizer integration).

    Attributes:
        params: the parameters whose gradients are clipped (``.grad`` not None), in stats row order.
        grads: their gradients (``params[i].grad``).
        names: their names.
        total_norm: float64 0-d, the global ``norm_type``-norm of the true (unscaled) gradients.
        tensor_norms: float64 ``[T]``, per-tensor norms of the true gradients.
        inv_scale: float64 0-d ``1 / amp_scale`` when the gradients still carry a GradScaler's
            scale, else None. Clippers that write gradients must multiply it in.
        update: bool 0-d, True when this step will be applied with finite norms: stateful
            clippers advance only then.
    """

    params: Sequence[torch.Tensor]
    grads: Sequence[torch.Tensor]
    names: Sequence[str]
    total_norm: torch.Tensor
    tensor_norms: torch.Tensor
    inv_scale: torch.Tensor | None
    update: torch.Tensor


class Clipper:
    """Base class. ``folds = True``: :meth:`coefficient` returns one global factor that the caller
    applies (folded into a fused optimizer's ``grad_scale``, else one scaling pass); ``folds =
    False``: :meth:`apply_` writes the gradients itself (AMP unscale included) and returns the
    per-tensor coefficients (float64 ``[T]``) or None."""

    folds: bool = True

    def coefficient(self, ctx: ClipContext) -> torch.Tensor:
        raise NotImplementedError

    def apply_(self, ctx: ClipContext) -> torch.Tensor | None:
        raise NotImplementedError

    # -- state ---------------------------------------------------------------------------
    _state_keys: tuple[str, ...] = ()
    _state_dtypes: dict[str, torch.dtype] = {}

    def state_dict(self) -> dict[str, Any]:
        """Hyper-parameters and device state (tensors cloned: later steps do not alter the dict)."""
        out: dict[str, Any] = {"type": type(self).__name__, "config": self._config()}
        for k in self._state_keys:
            v = getattr(self, k)
            out[k] = v.detach().clone() if isinstance(v, torch.Tensor) else v
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`. Raises ``ValueError`` (changing nothing) on a mismatch."""
        if state_dict.get("type") != type(self).__name__:
            raise ValueError(
                f"state_dict is for clipper {state_dict.get('type')!r}, not {type(self).__name__}"
            )
        if state_dict.get("config") != self._config():
            raise ValueError(
                f"{type(self).__name__}: saved configuration {state_dict.get('config')} differs from "
                f"this clipper's {self._config()}; build the clipper with the saved arguments"
            )
        missing = [k for k in self._state_keys if k not in state_dict]
        if missing:
            raise ValueError(f"{type(self).__name__}: state_dict lacks {missing}")
        for k, shape in self._state_shapes().items():
            v = state_dict[k]
            if not isinstance(v, torch.Tensor) or tuple(v.shape) != shape:
                raise ValueError(f"{type(self).__name__}: state_dict[{k!r}] must be a tensor of shape {shape}, "
                                 f"got {v!r}")
        for k in self._state_keys:
            v = state_dict[k]
            if isinstance(v, torch.Tensor):
                # own copies, in the dtypes the fused step epilogue writes through pointers
                v = v.detach().to(self._state_dtypes.get(k, v.dtype)).clone().contiguous()
            setattr(self, k, v)

    def _config(self) -> dict[str, Any]:
        return {}

    def _state_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape each state tensor must have (checked on load: the fused epilogue trusts it)."""
        return {}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._config().items())
        return f"{type(self).__name__}({args})"


def _clip_coef(threshold: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """torch's ``min(threshold / (norm + 1e-6), 1)`` in float64."""
    return torch.clamp(threshold / (norm + EPS), max=1.0)


class GlobalNorm(Clipper):
    """Clip the global norm to ``max_norm``: ``c = min(max_norm / (n + 1e-6), 1)``, as torch's
    ``clip_grad_norm_``. Stateless; folds into the fused step."""

    def __init__(self, max_norm: float) -> None:
        self.max_norm = _check_nonneg(max_norm, "GlobalNorm: max_norm")

    def _config(self) -> dict[str, Any]:
        return {"max_norm": self.max_norm}

    def coefficient(self, ctx: ClipContext) -> torch.Tensor:
        return _clip_coef(torch.tensor(self.max_norm, dtype=torch.float64, device=ctx.total_norm.device),
                          ctx.total_norm)


def _mul_per_tensor_(grads: Sequence[torch.Tensor], coefs: torch.Tensor) -> None:
    """``grads[i] *= coefs[i]`` in one multi-tensor call (``coefs`` float64 ``[T]`` on the grads' device).

    ``fastgrad.dispatch.scale_`` takes one coefficient; a per-tensor form there
    could also skip the write where ``coefs[i] == 1`` on the device.
    """
    if grads:
        torch._foreach_mul_(list(grads), list(coefs.unbind()))


class PerTensorNorm(Clipper):
    """Clip each tensor's norm to ``max_norm`` (Keras ``clipnorm``): ``c_i = max_norm / max(n_i, max_norm)``.

    Uses the per-tensor norms of the shared statistics pass (no read of its own);
    one multi-tensor scaling pass. Returns the ``[T]`` coefficients.
    """

    folds = False

    def __init__(self, max_norm: float) -> None:
        self.max_norm = _check_nonneg(max_norm, "PerTensorNorm: max_norm")

    def _config(self) -> dict[str, Any]:
        return {"max_norm": self.max_norm}

    def coefficients(self, tensor_norms: torch.Tensor) -> torch.Tensor:
        """float64 ``[T]`` Keras coefficients for the true per-tensor norms."""
        if self.max_norm == 0:
            return torch.zeros_like(tensor_norms)
        return self.max_norm / torch.clamp(tensor_norms, min=self.max_norm)

    def apply_(self, ctx: ClipContext) -> torch.Tensor:
        coefs = self.coefficients(ctx.tensor_norms)
        scaled = coefs if ctx.inv_scale is None else coefs * ctx.inv_scale
        _mul_per_tensor_(ctx.grads, scaled)
        return coefs


class Value(Clipper):
    """Clamp every element to ``[-clip_value, clip_value]`` (torch's ``clip_grad_value_``).

    One fused pass (plus one unscaling pass when a GradScaler's scale is still
    on the gradients, since the threshold applies to true gradients).
    """

    folds = False

    def __init__(self, clip_value: float) -> None:
        self.clip_value = _check_nonneg(clip_value, "Value: clip_value")

    def _config(self) -> dict[str, Any]:
        return {"clip_value": self.clip_value}

    def apply_(self, ctx: ClipContext) -> None:
        if ctx.inv_scale is not None:
            scale_op_(list(ctx.grads), ctx.inv_scale, None)
        clamp_op_(list(ctx.grads), self.clip_value, None)


class AutoClip(Clipper):
    """Clip to the ``percentile``-th percentile of the last ``history`` global norms (AutoClip).

    The history is a float64 ring buffer on the device; the percentile is read
    from a sort of it with the count of valid entries as a tensor, so nothing
    syncs. Folds into the fused step.
    """

    _state_keys = ("buffer", "count", "pos")
    _state_dtypes = {"buffer": torch.float64, "count": torch.int64, "pos": torch.int64}

    def __init__(self, percentile: float = 10, history: int = 1000) -> None:
        p = _check_nonneg(percentile, "AutoClip: percentile")
        if p > 100:
            raise ValueError(f"AutoClip: percentile must be in [0, 100], got {percentile!r}")
        if isinstance(history, bool) or not isinstance(history, int) or history < 1:
            raise ValueError(f"AutoClip: history must be a positive int, got {history!r}")
        self.percentile = p
        self.history = history
        self.buffer: torch.Tensor | None = None  # float64 [history]
        self.count: torch.Tensor | None = None  # int64 0-d: valid entries (<= history)
        self.pos: torch.Tensor | None = None  # int64 0-d: next slot to write

    def _config(self) -> dict[str, Any]:
        return {"percentile": self.percentile, "history": self.history}

    def _state_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"buffer": (self.history,), "count": (), "pos": ()}

    def state_dict(self) -> dict[str, Any]:
        self._ensure(torch.device("cpu"))
        return super().state_dict()

    def _ensure(self, device: torch.device) -> None:
        if self.buffer is None:
            self.buffer = torch.zeros(self.history, dtype=torch.float64, device=device)
            self.count = torch.zeros((), dtype=torch.int64, device=device)
            self.pos = torch.zeros((), dtype=torch.int64, device=device)
        elif self.buffer.device != device:
            self.buffer, self.count, self.pos = (t.to(device) for t in (self.buffer, self.count, self.pos))

    def threshold(self) -> torch.Tensor:
        """float64 0-d: the percentile of the current history (+inf while it is empty)."""
        valid = torch.arange(self.history, device=self.buffer.device) < self.count
        ordered = torch.where(valid, self.buffer, math.inf).sort().values
        n = self.count.clamp(min=1)
        rank = (n - 1).to(torch.float64) * (self.percentile / 100.0)  # numpy 'linear'
        lo = rank.floor().to(torch.int64)
        hi = torch.minimum(lo + 1, n - 1)
        v_lo, v_hi = ordered[lo], ordered[hi]
        t = v_lo + (v_hi - v_lo) * (rank - lo.to(torch.float64))
        t = torch.where(v_hi == v_lo, v_lo, t)  # avoids inf - inf; exact for repeated values
        return torch.where(self.count > 0, t, math.inf)

    def coefficient(self, ctx: ClipContext) -> torch.Tensor:
        self._ensure(ctx.total_norm.device)
        step = ctx.update.to(torch.int64)
        slot = torch.arange(self.history, device=self.buffer.device) == self.pos
        self.buffer = torch.where(slot & ctx.update, ctx.total_norm, self.buffer)
        self.count = torch.clamp(self.count + step, max=self.history)
        self.pos = (self.pos + step) % self.history
        return _clip_coef(self.threshold(), ctx.total_norm)


class ZClip(Clipper):
    """Z-score clipping against an EMA of the global norm's mean and variance (ZClip).

    Args:
        alpha: EMA factor for mean and variance.
        z_thresh: z-score above which a norm counts as a spike.
        warmup: norms collected before the EMA starts (mean and population variance of them).
        eps: added to the standard deviation in the z-score.
        max_norm: optional absolute cap on top of the adaptive threshold (and the only
            clipping during warm-up).
        mode: ``"adaptive"`` (the paper's default: ``mu + z_thresh * s / (z / z_thresh)``)
            or ``"mean"`` (clip spikes to ``mu``).
    """

    _state_keys = ("buffer", "seen", "mean", "var")
    _state_dtypes = {"buffer": torch.float64, "seen": torch.int64, "mean": torch.float64, "var": torch.float64}

    def __init__(self, alpha: float = 0.97, z_thresh: float = 2.5, warmup: int = 25, *,
                 eps: float = 1e-6, max_norm: float | None = None, mode: str = "adaptive") -> None:
        a = _check_nonneg(alpha, "ZClip: alpha")
        if a >= 1:
            raise ValueError(f"ZClip: alpha must be in [0, 1), got {alpha!r}")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"ZClip: warmup must be an int >= 1, got {warmup!r}")
        if mode not in ("adaptive", "mean"):
            raise ValueError(f"ZClip: mode must be 'adaptive' or 'mean', got {mode!r}")
        self.alpha = a
        self.z_thresh = _check_nonneg(z_thresh, "ZClip: z_thresh", positive=True)
        self.warmup = warmup
        self.eps = _check_nonneg(eps, "ZClip: eps")
        self.max_norm = None if max_norm is None else _check_nonneg(max_norm, "ZClip: max_norm")
        self.mode = mode
        self.buffer: torch.Tensor | None = None  # float64 [warmup]: the warm-up norms
        self.seen: torch.Tensor | None = None  # int64 0-d: warm-up norms collected (<= warmup)
        self.mean: torch.Tensor | None = None  # float64 0-d EMA mean
        self.var: torch.Tensor | None = None  # float64 0-d EMA variance

    def _config(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "z_thresh": self.z_thresh, "warmup": self.warmup,
                "eps": self.eps, "max_norm": self.max_norm, "mode": self.mode}

    def _state_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"buffer": (self.warmup,), "seen": (), "mean": (), "var": ()}

    def state_dict(self) -> dict[str, Any]:
        self._ensure(torch.device("cpu"))
        return super().state_dict()

    def _ensure(self, device: torch.device) -> None:
        if self.buffer is None:
            self.buffer = torch.zeros(self.warmup, dtype=torch.float64, device=device)
            self.seen = torch.zeros((), dtype=torch.int64, device=device)
            self.mean = torch.zeros((), dtype=torch.float64, device=device)
            self.var = torch.zeros((), dtype=torch.float64, device=device)
        elif self.buffer.device != device:
            self.buffer, self.seen, self.mean, self.var = (
                t.to(device) for t in (self.buffer, self.seen, self.mean, self.var)
            )

    @property
    def initialized(self) -> torch.Tensor:
        """bool 0-d: warm-up is over and the EMA is live."""
        return self.seen >= self.warmup

    def coefficient(self, ctx: ClipContext) -> torch.Tensor:
        self._ensure(ctx.total_norm.device)
        n = ctx.total_norm
        live = self.initialized
        cap = math.inf if self.max_norm is None else self.max_norm

        # warm-up: collect n (only on applied, finite steps); start the EMA when full
        collect = ctx.update & ~live
        slot = torch.arange(self.warmup, device=n.device) == self.seen
        self.buffer = torch.where(slot & collect, n, self.buffer)
        seen = self.seen + collect.to(torch.int64)
        start = collect & (seen == self.warmup)
        w_mean = self.buffer.mean()
        w_var = ((self.buffer - w_mean) ** 2).mean()
        warm_coef = torch.clamp(cap / (n + EPS), max=1.0)

        # live: z-score against the EMA
        std = self.var.sqrt()
        z = (n - self.mean) / (std + self.eps)
        spike = z > self.z_thresh
        if self.mode == "adaptive":
            adaptive = self.mean + self.z_thresh * std / (z / self.z_thresh)
        else:
            adaptive = self.mean
        x = torch.where(spike, adaptive, n)  # what the EMA is fed: the clipped norm
        t = torch.clamp(x, max=cap)
        live_coef = torch.where(n > t, t / (n + EPS), 1.0)
        new_mean = self.alpha * self.mean + (1 - self.alpha) * x
        new_var = self.alpha * self.var + (1 - self.alpha) * (x - new_mean) ** 2
        advance = ctx.update & live

        self.mean = torch.where(start, w_mean, torch.where(advance, new_mean, self.mean))
        self.var = torch.where(start, w_var, torch.where(advance, new_var, self.var))
        self.seen = seen
        return torch.where(live, live_coef, warm_coef)


NameFilter = Container[str] | Callable[[str], bool]


class AGC(Clipper):
    """Adaptive gradient clipping, unit-wise ``||G_u|| / ||W_u||`` (NFNets); units in the module docstring.

    Args:
        clip_factor: ``lambda``; a unit's gradient norm is capped at ``clip_factor * max(||W_u||, eps)``.
        eps: floor of the parameter norm (so zero-initialised units can still move).
        exclude: parameter names (a container, or a predicate on the name) left unclipped,
            e.g. the final classifier layer as in the paper.

    One read of every parameter and gradient for the unit norms (float32 accumulation, or
    float64 for float64 tensors) and one in-place scaling, per tensor; no host sync.
    Returns None (coefficients are per unit).
    """

    folds = False

    def __init__(self, clip_factor: float = 0.01, eps: float = 1e-3, *, exclude: NameFilter = ()) -> None:
        self.clip_factor = _check_nonneg(clip_factor, "AGC: clip_factor", positive=True)
        self.eps = _check_nonneg(eps, "AGC: eps")
        if not (callable(exclude) or isinstance(exclude, Container)):
            raise TypeError("AGC: exclude must be a container of parameter names or a callable name -> bool")
        self.exclude = exclude

    def _config(self) -> dict[str, Any]:
        return {"clip_factor": self.clip_factor, "eps": self.eps}

    def _excluded(self, name: str) -> bool:
        return bool(self.exclude(name)) if callable(self.exclude) else name in self.exclude

    @staticmethod
    def unit_norms(t: torch.Tensor) -> torch.Tensor:
        """Frobenius norm of each unit of ``t``, shaped to broadcast against ``t`` (float32/64)."""
        acc = torch.float64 if t.dtype == torch.float64 else torch.float32
        if t.dim() <= 1:
            return torch.linalg.vector_norm(t, dtype=acc)
        return torch.linalg.vector_norm(t, dim=tuple(range(1, t.dim())), keepdim=True, dtype=acc)

    def apply_(self, ctx: ClipContext) -> None:
        with torch.no_grad():
            for p, g, name in zip(ctx.params, ctx.grads, ctx.names):
                if self._excluded(name):
                    if ctx.inv_scale is not None:
                        g.mul_(ctx.inv_scale.to(g.device))
                    continue
                inv = None if ctx.inv_scale is None else ctx.inv_scale.to(g.device, torch.float32)
                gn = self.unit_norms(g)
                if inv is not None:
                    gn = gn * inv
                cap = self.clip_factor * torch.clamp(self.unit_norms(p.detach()), min=self.eps)
                coef = torch.where(gn > cap, cap / torch.clamp(gn, min=1e-6), 1.0)
                if inv is not None:
                    coef = coef * inv
                g.mul_(coef)

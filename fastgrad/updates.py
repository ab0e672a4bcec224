"""Update norms: ``||w_after - w_before||`` per tensor, per group and in total, for one optimizer step.

Use around any ``opt.step()``::

    tracker = UpdateTracker(opt, model=model)     # once; registers step hooks on opt
    tracker.before_step()                         # on monitored steps only
    opt.step()                                    # or scaler.step(opt), or a fastgrad wrapper
    upd = tracker.after_step()                    # UpdateStats, float64 device tensors, no sync

Two paths, chosen per tensor in :meth:`UpdateTracker.before_step` (``UpdateStats.paths``):

- ``"derived"``: Δw is computed after the step from the optimizer's own state and the new
  weights, with no copy of the weights. Exact formulas of torch 2.13's ``torch/optim`` (all of
  single-tensor, foreach and fused, which compute the same update), with ``w = w_after``:

  - Adam: ``Δw = -lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps)``, ``bc_i = 1 - beta_i^t``, ``v`` the
    ``max_exp_avg_sq`` under amsgrad; L2 weight decay and ``maximize`` are already inside ``m``.
  - AdamW (``decoupled_weight_decay``): ``w = w_b (1 - lr wd) + u`` with ``u`` the Adam step,
    so ``Δw = (u - lr wd w) / (1 - lr wd)``.
  - SGD with momentum (not Nesterov): ``Δw = -lr * buf`` (the momentum buffer after the step
    already holds weight decay, dampening and the sign of ``maximize``).
  - SGD without momentum or with Nesterov: ``g' = ±g + wd w_b`` holds the old weights; solving
    ``Δw = -lr (g' + mu buf)`` for ``w_b = w - Δw`` gives
    ``Δw = -lr (±g + wd w + mu buf) / (1 - lr wd)`` (``mu buf`` only with Nesterov).
  - Adagrad: ``Δw = -clr (±g + wd w) / (sqrt(sum) + eps - clr wd)``,
    ``clr = lr / (1 + (t - 1) lr_decay)``.
  - RMSprop: ``avg = sqrt(sq - centered * ga^2) + eps``; momentum: ``Δw = -lr * buf``, else
    ``Δw = -lr (±g + wd w) / (avg - lr wd)``.

  Cost: ``||w_before||`` is read before the step (:meth:`UpdateTracker.before_step`: one
  read-only fused norm pass over the weights; exact, and cheaper than rebuilding ``w - Δw``
  after). After the step, ``Δw = scale * x`` with the scalar factor kept out of the elements:
  SGD/RMSprop momentum and plain SGD norm ``buf`` or ``.grad`` where they lie (one read, nothing
  written); Adam writes ``x = m / (sqrt(v) + eps s)`` (AdamW: ``+ (wd bc1 / s) w``) in place in
  one workspace tensor (reads ``m``, ``v``, ``w``: four elementwise passes), Adagrad and
  RMSprop likewise with a second tensor when ``weight_decay != 0``; then one fused norm pass per
  ``max_batch_bytes`` of workspace. The workspace is reused from step to step (at most
  ``max_batch_bytes`` plus two copies of the largest tensor, never more than two copies of the
  monitored weights). Nothing but the ``[T]`` weight norms is held between ``before_step`` and
  ``after_step``. A step that did not happen gives 0: the step
  counter (Adam, Adagrad, RMSprop; it does not advance when a fused kernel skips on
  ``found_inf``), else whether ``step()`` ran, which tensors had a gradient at that moment and
  the ``found_inf`` it saw (SGD).
  Accuracy: this is the update the optimizer computed; the stored weights are rounded after
  adding it, so ``||Δw||`` differs from ``||fl(w_b + Δw) - w_b||`` by at most
  ``~eps_dtype ||w|| / ||Δw||`` relative (float32 weights at an update ratio of 1e-3: <= 6e-5
  worst case, ~1e-7 for random rounding over many elements); exact for float64 weights.
- ``"snapshot"``: a copy of the tensor before the step, the difference after (in float32 for
  bfloat16/float16 weights). Cost: one copy of the monitored weights held over the step (their
  bytes in memory, one read + one write) and the norm pass of ``before_step``, then the
  difference in place in the copy and its norm. Taken for every other optimizer
  (Adamax, NAdam, LBFGS, custom ones, ``differentiable=True``), for complex or low-precision
  weights (where the rounded realised update is what matters), for sparse gradients, and for
  gradient-based formulas under a fused kernel (a fused kernel may unscale ``.grad``).

Rows: per tensor ``update_norms`` ``||Δw||``, ``param_norms`` ``||w_before||`` and
``update_ratio`` ``||Δw|| / ||w_before||`` (0 where Δw = 0, Inf where only w_before is 0);
the same per group (the optimizer's param groups by default, or ``groups=`` as in
:func:`fastgrad.grad_stats`) and in total, combined with the scaled norm formula
(:func:`fastgrad.aggregate.combine_norms`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from . import aggregate

__all__ = ["UpdateStats", "UpdateTracker"]

_DERIVED_DTYPES = (torch.float32, torch.float64)


@dataclass(frozen=True, eq=False)
class UpdateStats:
    """Norms of one step's update. Every tensor is float64 on the weights' (first) device."""

    names: tuple[str, ...]
    paths: tuple[str, ...]  # "derived" or "snapshot" per tensor
    update_norms: torch.Tensor  # [T] ||w_after - w_before||
    param_norms: torch.Tensor  # [T] ||w_before||
    update_ratio: torch.Tensor  # [T]
    group_names: tuple[str, ...]
    group_update_norms: torch.Tensor  # [G]
    group_param_norms: torch.Tensor
    group_update_ratio: torch.Tensor
    total_update_norm: torch.Tensor  # 0-d
    total_param_norm: torch.Tensor
    total_update_ratio: torch.Tensor

    def to_dict(self) -> dict[str, dict[str, float]]:
        """``{"tensors"|"groups"|"total": {name: {"update_norm", "param_norm", "update_ratio"}}}``
        as host floats (synchronises)."""
        def rows(names, *cols):
            vals = torch.stack([c.reshape(-1).cpu() for c in cols], 1).tolist()
            return {n: dict(zip(("update_norm", "param_norm", "update_ratio"), v)) for n, v in zip(names, vals)}

        return {"tensors": rows(self.names, self.update_norms, self.param_norms, self.update_ratio),
                "groups": rows(self.group_names, self.group_update_norms, self.group_param_norms,
                               self.group_update_ratio),
                "total": rows(("total",), self.total_update_norm, self.total_param_norm,
                              self.total_update_ratio)["total"]}


def _ratio(upd: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.where(upd == 0, torch.zeros_like(upd), upd / w)


def _host(x):
    """A CPU scalar tensor as a Python float (no device sync); other values unchanged."""
    if isinstance(x, torch.Tensor) and x.device.type == "cpu" and x.numel() == 1:
        return float(x)
    return x


# -- the closed forms ---------------------------------------------------------------------------
# Each returns ``(x, scale)`` with ``Δw = scale * x`` (so ``||Δw|| = |scale| ||x||``), ``w`` the
# weight after the step; ``take()`` hands out a workspace tensor like ``w``. The optimizer's state
# and .grad are only read. Written for few passes over memory: the scalar factor of the update is
# never multiplied into the elements (it scales the norm), a single scaled term is normed where it
# lies (SGD/RMSprop momentum: ``-lr * buf`` reads ``buf`` once and writes nothing), and the rest
# is built in place in one workspace tensor where it can be. ``scale`` is a Python float; device-
# tensor coefficients (capturable steps, a tensor lr on an accelerator) take plain tensor
# arithmetic into the workspace with ``scale = 1``.

def _num(*xs) -> bool:
    return all(not isinstance(x, torch.Tensor) for x in xs)


def _lin(terms, take):
    """``(x, scale)`` with ``scale * x = sum(c * v for c, v in terms)`` (None terms skipped)."""
    terms = [(c, v) for c, v in terms if v is not None]
    (c0, x0), rest = terms[0], terms[1:]
    if _num(*(c for c, _ in terms)):
        if not rest:
            return x0, float(c0)  # nothing to materialise
        out = torch.mul(x0, c0, out=take())
        for c, v in rest:
            out.add_(v, alpha=c)
        return out, 1.0
    acc = x0 * c0
    for c, v in rest:
        acc = acc + v * c
    return take().copy_(acc), 1.0


def _over(g, w, wd, sign, denom, take):
    """``(g + sign wd w) / denom``, written into ``denom`` (a workspace tensor) when ``wd = 0``, else
    into a second one; the callers' scale carries ``sign`` (``±g + wd w = sign (g + sign wd w)``)."""
    if wd == 0:
        return torch.div(g, denom, out=denom)
    num = torch.add(g, w, alpha=sign * wd, out=take())
    return num.div_(denom)


def _adam(w, st, h, g, take):
    t = _host(st["step"])
    t = t.double() if isinstance(t, torch.Tensor) else t
    lr, eps, wd = _host(h["lr"]), h["eps"], _host(h["weight_decay"])
    b1, b2 = (_host(b) for b in h["betas"])
    bc1, s = 1 - b1 ** t, (1 - b2 ** t) ** 0.5
    v = st["max_exp_avg_sq"] if h.get("amsgrad", False) else st["exp_avg_sq"]
    m = st["exp_avg"]
    # m / (sqrt(v)/s + eps) = s * m / (sqrt(v) + eps s): the scale folded into the coefficient
    c = -lr * s / bc1
    decoupled = wd != 0 and h.get("decoupled_weight_decay", False)
    k = 1 / (1 - lr * wd) if decoupled else 1.0
    if _num(c, s, k, lr, wd):
        if c == 0:  # lr = 0: no update (AdamW's decay is lr * wd too)
            return w.new_zeros(0), 0.0
        q = torch.sqrt(v, out=take()).add_(eps * s)
        torch.div(m, q, out=q)  # q = m / (sqrt(v) + eps s); Adam's step is u = c q
        if decoupled:  # Δw = k (u - lr wd w) = c k (q - (lr wd / c) w)
            q.add_(w, alpha=-lr * wd / c)
        return q, c * k
    u = m / (torch.sqrt(v) + eps * s) * c
    return take().copy_((u - (lr * wd) * w) * k if decoupled else u), 1.0


def _sign(h) -> float:
    return -1.0 if h.get("maximize", False) else 1.0


def _sgd(w, st, h, g, take):
    lr, wd, mu = _host(h["lr"]), _host(h["weight_decay"]), h["momentum"]
    if mu != 0 and not h["nesterov"]:
        return _lin([(-lr, st["momentum_buffer"])], take)
    k = -lr / (1 - lr * wd)
    return _lin([(k * _sign(h), g), (k * wd, w if wd != 0 else None),
                 (k * mu, st["momentum_buffer"] if mu != 0 else None)], take)


def _adagrad(w, st, h, g, take):
    lr, wd, eps, decay = _host(h["lr"]), h["weight_decay"], h["eps"], h["lr_decay"]
    clr = lr / (1 + (_host(st["step"]) - 1) * decay)
    if not _num(clr):
        d = -clr * (_sign(h) * g + wd * w) / (torch.sqrt(st["sum"]) + (eps - clr * wd))
        return take().copy_(d), 1.0
    denom = torch.sqrt(st["sum"], out=take()).add_(eps - clr * wd)
    return _over(g, w, wd, _sign(h), denom, take), -clr * _sign(h)


def _rmsprop(w, st, h, g, take):
    lr, wd, eps, mu = _host(h["lr"]), h["weight_decay"], h["eps"], h["momentum"]
    if mu > 0:
        return _lin([(-lr, st["momentum_buffer"])], take)
    sq = st["square_avg"]
    if h["centered"]:
        avg = torch.addcmul(sq, st["grad_avg"], st["grad_avg"], value=-1, out=take()).sqrt_()
    else:
        avg = torch.sqrt(sq, out=take())
    if not _num(lr):
        return avg.copy_(-lr * (_sign(h) * g + wd * w) / (avg + (eps - lr * wd))), 1.0
    return _over(g, w, wd, _sign(h), avg.add_(eps - lr * wd), take), -lr * _sign(h)


class _Workspace:
    """Flat buffers per (dtype, device), handed out as views and reused from step to step (the
    views too: a step hands out the same (offset, shape) sequence as the last, and making a view
    costs a few microseconds per tensor)."""

    def __init__(self) -> None:
        self.buffers: dict[tuple, torch.Tensor] = {}
        self.used: dict[tuple, int] = {}
        self.views: dict[tuple, torch.Tensor] = {}

    def reset(self) -> None:
        self.used.clear()

    def take(self, like: torch.Tensor, need_total: int) -> torch.Tensor:
        key = (like.dtype, like.device)
        start = self.used.get(key, 0)
        n = like.numel()
        self.used[key] = start + n
        buf = self.buffers.get(key)
        if buf is None or buf.numel() < max(start + n, need_total):
            # grows only at the start of a batch (need_total: the largest batch of this step)
            if buf is not None and start:
                raise RuntimeError("internal: workspace grown mid-batch")
            buf = self.buffers[key] = torch.empty(max(start + n, need_total), dtype=like.dtype,
                                                  device=like.device)
            self.views = {k: v for k, v in self.views.items() if k[0] != key}  # views of the old buffer
        vkey = (key, start, like.shape)
        view = self.views.get(vkey)
        if view is None:
            view = self.views[vkey] = buf[start:start + n].view(like.shape)
        return view


# (formula, needs the gradient?(group), keeps a step counter)
def _needs_grad_sgd(h):
    return h["momentum"] == 0 or h["nesterov"]


def _unwrap(f):
    # torch wraps step() (profile_hook_step, _use_grad_for_differentiable) with functools.wraps
    while hasattr(f, "__wrapped__"):
        f = f.__wrapped__
    return f


_FORMULAS = {
    _unwrap(torch.optim.Adam.step): (_adam, lambda h: False, True),  # also AdamW (a subclass)
    _unwrap(torch.optim.SGD.step): (_sgd, _needs_grad_sgd, False),
    _unwrap(torch.optim.Adagrad.step): (_adagrad, lambda h: True, True),
    _unwrap(torch.optim.RMSprop.step): (_rmsprop, lambda h: h["momentum"] <= 0, True),
}


def _formula_for(opt: torch.optim.Optimizer):
    """The closed form of ``opt``'s step, if its class steps with one of torch's own step()s."""
    return _FORMULAS.get(_unwrap(type(opt).step))


class UpdateTracker:
    """Norms of ``w_after - w_before`` for the steps of ``optimizer`` (see the module docstring).

    Args:
        optimizer: any ``torch.optim.Optimizer``.
        model: a Module, to name tensors after ``named_parameters()`` (else ``"{group}.{index}"``).
        groups: row groups: None (the optimizer's param groups, ``group["name"]`` or
            ``"group{i}"``) or any ``groups=`` of :func:`fastgrad.grad_stats` over the names.
        mode: ``"auto"`` (derive where a closed form exists) or ``"snapshot"`` (always copy).
        max_batch_bytes: temporaries materialised per fused norm pass on the derived path.

    The tracker registers a step pre-hook on ``optimizer`` (``remove()`` takes it off); it
    records, when armed by :meth:`before_step`, whether ``step()`` ran, which
    tensors had a gradient at that moment and any ``found_inf`` passed to a fused kernel.
    Register the tracker after ``fastgrad.attach`` (hooks run in registration order), or call
    :meth:`note_step` from a wrapper that steps the optimizer another way.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, model: torch.nn.Module | None = None,
                 groups: Any = None, mode: str = "auto", max_batch_bytes: int = 1 << 28) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if mode not in ("auto", "snapshot"):
            raise ValueError(f"mode must be 'auto' or 'snapshot', got {mode!r}")
        self.optimizer = optimizer
        self.mode = mode
        self.max_batch_bytes = int(max_batch_bytes)
        self._names = {id(p): n for n, p in model.named_parameters()} if model is not None else None
        self._groups_arg = groups
        self._formula = _formula_for(optimizer) if mode == "auto" else None
        self._armed: dict[str, Any] | None = None
        self._segments: dict[tuple, Any] = {}
        self._workspace = _Workspace()
        self._given_index = None
        self._handles = [optimizer.register_step_pre_hook(self._pre_hook)]

    def remove(self) -> None:
        """Take the tracker's hooks off the optimizer."""
        for h in self._handles:
            h.remove()
        self._handles = []

    # -- hooks --------------------------------------------------------------------------------------
    def _pre_hook(self, opt, args, kwargs) -> None:
        found_inf = (kwargs or {}).get("found_inf", getattr(opt, "found_inf", None))
        self.note_step(found_inf=found_inf)

    def note_step(self, found_inf: torch.Tensor | None = None) -> None:
        """Record that the optimizer is about to step now (called by the pre-hook): which tensors
        have a gradient, and ``found_inf`` (a fused kernel skips the whole update where it is 1)."""
        a = self._armed
        if a is None:
            return
        a["stepped"] = True
        a["found_inf"] = found_inf
        a["has_grad"] = [p.grad is not None for p in a["params"]]

    # -- the step -----------------------------------------------------------------------------------
    @torch.no_grad()
    def before_step(self, param_norms: tuple[Sequence[torch.Tensor], torch.Tensor] | None = None) -> None:
        """Arm the tracker for the next ``step()``: choose each tensor's path, snapshot those that
        need it, note the step counters and read ``||w_before||`` (one fused norm pass; no sync).

        Args:
            param_norms: ``(params, norms)``, the L2 norms of the current weights of ``params``
                already computed for this step (float64 ``[len(params)]`` on their device, e.g.
                ``grad_stats(params, params=True).params.tensor_norms``, read in the statistics
                pass before the step). When ``params`` holds every tensor of the optimizer, the
                tracker takes its ``||w_before||`` from them instead of reading the weights again.
        """
        opt = self.optimizer
        params, names, labels, paths, kinds, snaps, counters = [], [], [], [], [], [], []
        for gi, group in enumerate(opt.param_groups):
            glabel = str(group.get("name", f"group{gi}"))
            formula = self._formula
            for pi, p in enumerate(group["params"]):
                params.append(p)
                names.append(self._names.get(id(p), f"{gi}.{pi}") if self._names else f"{gi}.{pi}")
                labels.append(glabel)
                derivable = (formula is not None and p.dtype in _DERIVED_DTYPES
                             and not group.get("differentiable", False)
                             and (p.grad is None or p.grad.layout == torch.strided)
                             and not (group.get("fused") and formula[1](group)))
                paths.append("derived" if derivable else "snapshot")
                kinds.append(gi)
                snaps.append(None if derivable else p.detach().clone())
                st = opt.state.get(p, {}) if derivable and formula[2] else None
                c = st.get("step") if st else None
                if not (derivable and formula[2]):
                    counters.append(None)
                elif isinstance(c, torch.Tensor) and c.device.type != "cpu":  # capturable: no sync
                    counters.append(c.detach().clone())
                else:  # a host number, or a CPU tensor read without a sync (a clone costs more)
                    counters.append(float(c) if c is not None else 0.0)
        if self._groups_arg is not None:
            from .stats import group_labels

            labels = group_labels(names, self._groups_arg)
        # ||w_before|| now, in one read-only fused pass: cheaper than rebuilding w_b = w - Δw after
        # the step (a write and a read of every tensor), and exact whatever the optimizer does
        dev = params[0].device if params else torch.device("cpu")
        wn = self._given_norms(params, param_norms) if param_norms is not None else None
        if wn is None:
            wn = (_norms([torch.view_as_real(p.detach()) if p.is_complex() else p.detach() for p in params])
                  if params else torch.zeros(0, dtype=torch.float64, device=dev))
        self._armed = {"params": params, "names": tuple(names), "labels": tuple(labels),
                       "paths": tuple(paths), "group_index": kinds, "snaps": snaps, "counters": counters,
                       "param_norms": wn, "stepped": False, "found_inf": None,
                       "has_grad": [p.grad is not None for p in params]}

    @torch.no_grad()
    def after_step(self) -> UpdateStats:
        """The norms of the update made since :meth:`before_step` (float64 device tensors, no sync)."""
        a = self._armed
        if a is None:
            raise RuntimeError("UpdateTracker.after_step() without before_step(): call before_step() "
                               "right before optimizer.step()")
        self._armed = None
        opt = self.optimizer
        groups = opt.param_groups
        formula = self._formula
        xs: list[torch.Tensor] = []  # ||Δw_i|| = |scales[i]| * ||xs[i]||
        scales: list[float] = []
        norms: list[torch.Tensor] = []
        ws = self._workspace
        ws.reset()
        plan = self._batches(a)
        pending = 0

        def flush():
            nonlocal pending
            if xs:
                norms.append(_norms(xs))
                xs.clear()
            ws.reset()  # the views are free again: later writes are ordered after the norm pass
            pending = 0

        for i, p in enumerate(a["params"]):
            w = p.detach()
            snap = a["snaps"][i]
            x, scale = None, 1.0
            if snap is not None:
                if w.dtype in (torch.float16, torch.bfloat16):
                    x = w.float() - snap.float()  # exact difference, no rounding
                elif w.is_complex():
                    x = torch.view_as_real(snap.sub_(w))  # the snapshot is not needed any more
                else:
                    x = snap.sub_(w)  # w_before - w_after: the same norm
            elif a["stepped"] and a["has_grad"][i]:
                h = groups[a["group_index"][i]]
                st = opt.state.get(p, {})
                keep = self._keep(a, i, st)
                if not (isinstance(keep, float) and keep == 0.0):
                    need = plan[(w.dtype, w.device)]
                    x, scale = formula[0](w, st, h, p.grad, lambda w=w, need=need: ws.take(w, need))
                    if isinstance(keep, float):
                        scale *= keep
                    else:  # a device 0-d tensor (a capturable step counter): applied on the device
                        x = x * keep
            if x is None:
                x, scale = w.new_zeros(0), 0.0
            xs.append(x)
            scales.append(abs(scale))
            pending += 2 * w.numel() * w.element_size()
            if pending >= self.max_batch_bytes:
                flush()
        flush()
        wn = a["param_norms"]
        if norms:
            sc = torch.tensor(scales, dtype=torch.float64)
            un = torch.cat(norms) * (sc if wn.device.type == "cpu" else sc.to(wn.device, non_blocking=True))
        else:
            un = torch.zeros(0, dtype=torch.float64, device=wn.device)
        return self._rows(a, un, wn)

    def _given_norms(self, params: list[torch.Tensor], given) -> torch.Tensor | None:
        """``||w||`` of ``params`` picked out of ``given = (tensors, norms)``, or None if some
        tensor is not among them. The index is cached while both lists stay the same."""
        tensors, norms = given
        if not isinstance(norms, torch.Tensor) or norms.dim() != 1 or norms.numel() != len(tensors):
            raise ValueError(f"param_norms must be (params, norms) with norms a 1-d tensor of len(params) = "
                             f"{len(tensors)} values, got {type(norms).__name__} of shape "
                             f"{tuple(getattr(norms, 'shape', ()))}")
        key = (tuple(map(id, tensors)), tuple(map(id, params)), norms.device)
        cached = self._given_index
        if cached is None or cached[0] != key:
            pos = {id(t): i for i, t in enumerate(tensors)}
            if not all(id(p) in pos for p in params):
                return None
            idx = torch.tensor([pos[id(p)] for p in params], dtype=torch.long).to(norms.device)
            cached = self._given_index = (key, idx)
        return norms.index_select(0, cached[1]).to(torch.float64)

    def _batches(self, a) -> dict[tuple, int]:
        """Workspace elements per (dtype, device): two buffers per tensor over the largest batch,
        so that the buffers are allocated once, at their final size."""
        need: dict[tuple, int] = {}
        cur: dict[tuple, int] = {}
        pending = 0
        for p in a["params"]:
            key = (p.dtype, p.device)
            cur[key] = cur.get(key, 0) + 2 * p.numel()
            need[key] = max(need.get(key, 0), cur[key])
            pending += 2 * p.numel() * p.element_size()
            if pending >= self.max_batch_bytes:
                cur.clear()
                pending = 0
        return need

    def _keep(self, a, i, st):
        """1 if the tensor was updated by this step, else 0 (a float, or a device 0-d tensor)."""
        before = a["counters"][i]
        if before is not None:  # a step counter: it advanced iff the update was applied
            after = st.get("step") if st else None
            if after is None:
                return 0.0
            if isinstance(after, torch.Tensor) and after.device.type != "cpu":
                return (after.double() - before.double())
            return float(after) - float(before)
        fi = a["found_inf"]
        if fi is None:
            return 1.0
        return 1.0 - fi.double()

    def _rows(self, a, un: torch.Tensor, wn: torch.Tensor) -> UpdateStats:
        labels = a["labels"]
        order: dict[str, int] = {}
        for lab in labels:
            order.setdefault(lab, len(order))
        key = (labels, un.device)
        seg = self._segments.get(key)
        if seg is None:
            seg = aggregate.Segments([order[lab] for lab in labels], len(order), un.device)
            self._segments[key] = seg
        gu = aggregate.combine_norms(un, 2.0, seg)
        gw = aggregate.combine_norms(wn, 2.0, seg)
        tu = aggregate.combine_norms(un, 2.0, aggregate.TOTAL).reshape(())
        tw = aggregate.combine_norms(wn, 2.0, aggregate.TOTAL).reshape(())
        return UpdateStats(a["names"], a["paths"], un, wn, _ratio(un, wn), tuple(order), gu, gw,
                           _ratio(gu, gw), tu, tw, _ratio(tu, tw))


def _norms(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """float64 ``[N]`` L2 norms of ``tensors`` in one fused pass (fastgrad.grad_stats)."""
    import warnings

    from .stats import grad_stats

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # all-empty lists are fine here
        return grad_stats(list(tensors), norm_types=(2,), histogram=False).tensor_norms

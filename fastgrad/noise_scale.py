"""The gradient noise scale B_simple = tr(Sigma) / |G|^2 (McCandlish et al. 2018, appendix A.1).

``G`` is the true (full-data) gradient and ``Sigma`` the covariance of one example's gradient.
A gradient estimated from a batch of ``B`` examples has ``E|G_B|^2 = |G|^2 + tr(Sigma)/B``, so
the squared norms at two batch sizes ``B_small < B_big`` give unbiased estimates of both::

    |G|^2     ~ (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
    tr(Sigma) ~ (|G_small|^2 - |G_big|^2) / (1/B_small - 1/B_big)

Smoothing: each of the two per-step estimates is a difference of noisy squared norms, unbiased
but noisy (``|G|^2`` is often negative on a single step). Their ratio on one step is therefore
undefined or heavy-tailed and ``E[ratio] != ratio of E``; the paper's remedy is to average the
numerator and the denominator separately. :class:`NoiseScale` keeps an exponential moving
average (EMA, ``beta``) of each and reports ``B_simple = EMA(tr) / EMA(|G|^2)``: a ratio of two
consistent averages, biased only at O(1/effective samples). The EMA's start-up bias (Adam's
``1 - beta^t``) is the same factor for both and cancels in the ratio; ``gradient_sq`` and
``trace`` divide it out. A step whose estimates are not finite (NaN/Inf gradients) leaves the
averages unchanged.

Where the two batch sizes come from:

- Gradient accumulation (one process): ``k`` micro-batches of ``b`` examples each; the first
  micro-batch's gradient (``.grad`` right after the first backward, when ``.grad`` was zero or
  None before it) is a batch of ``b``; the accumulated gradient after the last is a batch of
  ``k*b``. One fused norm pass after the first backward and one after the last (this one can
  be the monitor's or the clip's total norm) -- no copy of any gradient.
  See :meth:`NoiseScale.first_micro_batch` and :meth:`NoiseScale.accumulated`.
- DDP: each rank's local gradient (its ``b`` examples) before the all-reduce is the small
  batch, the averaged gradient (``world * b`` examples) the big one; a DDP communication hook
  reads each bucket in the fused pass before and after the all-reduce
  (:func:`register_ddp_hook`). ``|G_small|^2`` is the mean over ranks of the local squared
  norms (one 8-byte all-reduce per step), so every rank holds the same estimate.
- FSDP2: a custom reduce-scatter (``FSDPModule.set_custom_reduce_scatter``, public in torch
  2.13) sees each FSDP group's reduce-scatter input, the rank's whole local unsharded gradient
  of that group (zero-padded), before the reduction, and its output shard after it
  (:func:`register_fsdp_hook`). The big batch is the reduce-scatter group (``world * b``).

Nothing here synchronises with the host: the state is device tensors. Reading a value
(``float(ns.b_simple)``, :meth:`NoiseScale.to_dict`) is the caller's sync.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

__all__ = ["NoiseScale", "DDPNoiseScaleHook", "FSDPNoiseScaleHook", "register_ddp_hook", "register_fsdp_hook",
           "two_batch_estimates"]

_Number = float | int | torch.Tensor


def two_batch_estimates(small_sq: _Number, big_sq: _Number, b_small: float, b_big: float):
    """Unbiased one-step estimates ``(|G|^2, tr(Sigma))`` from squared gradient norms at two
    batch sizes (McCandlish et al. 2018, A.1); ``b_small < b_big`` (examples per batch).

    ``small_sq`` and ``big_sq`` are ``|G_small|^2`` and ``|G_big|^2`` (tensors or numbers; the
    results follow torch's type promotion, float64 for float64 input). No host sync.
    """
    b_small, b_big = float(b_small), float(b_big)
    if not (0 < b_small < b_big) or math.isinf(b_big):
        raise ValueError(f"need 0 < b_small < b_big (finite), got b_small={b_small}, b_big={b_big}")
    g2 = (b_big * big_sq - b_small * small_sq) / (b_big - b_small)
    trace = (small_sq - big_sq) / (1.0 / b_small - 1.0 / b_big)
    return g2, trace


def _sq_norm(tensors) -> torch.Tensor:
    """float64 0-d ``sum of squares`` of all gradients in ``tensors`` (one fused pass, no sync)."""
    from .stats import grad_stats

    st = grad_stats(tensors, norm_types=(2,), histogram=False)
    return st.total_norm.square()


class NoiseScale:
    """EMA estimate of the gradient noise scale ``B_simple = tr(Sigma) / |G|^2``.

    Args:
        beta: EMA decay per step, in ``[0, 1)``. The default 0.99 averages over ~100 steps:
            the per-step estimates have a relative standard deviation of order 1-10 (they are
            differences of noisy squared norms), so tens to hundreds of steps are needed for a
            usable ratio, while B_simple itself drifts over thousands of steps.

    Feed it one step at a time with :meth:`update` (any two batch sizes), or through
    :meth:`first_micro_batch` + :meth:`accumulated` (gradient accumulation),
    :meth:`register_ddp_hook` (DDP) or :meth:`register_fsdp_hook` (FSDP2). Results are float64
    0-d tensors on the gradients' device (state: six 0-d tensors; ~12 small ops per step):

    - ``b_simple``: ``EMA(tr) / EMA(|G|^2)`` (NaN before the first finite step);
    - ``gradient_sq``, ``trace``: the bias-corrected EMAs of ``|G|^2`` and ``tr(Sigma)``;
    - ``last_gradient_sq``, ``last_trace``: the last step's raw estimates (for logging).
    """

    def __init__(self, beta: float = 0.99) -> None:
        beta = float(beta)
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        self.beta = beta
        self._state: dict[str, torch.Tensor] | None = None
        self._first_sq: torch.Tensor | None = None

    # -- core --------------------------------------------------------------------------------------
    def _ensure(self, device: torch.device) -> dict[str, torch.Tensor]:
        if self._state is None:
            z = torch.zeros((), dtype=torch.float64, device=device)
            nan = torch.full((), math.nan, dtype=torch.float64, device=device)
            self._state = {"ema_g2": z.clone(), "ema_trace": z.clone(), "ema_weight": z.clone(),
                           "last_g2": nan.clone(), "last_trace": nan.clone(), "steps": z.clone()}
        return self._state

    @torch.no_grad()
    def update(self, small_sq: _Number, big_sq: _Number, b_small: float, b_big: float) -> None:
        """Add one step: ``|G_small|^2`` at ``b_small`` examples, ``|G_big|^2`` at ``b_big``.

        ``small_sq`` may already be a mean over several independent small batches of the same
        size (it is then still unbiased, with less variance). No host sync.
        """
        dev = next((t.device for t in (small_sq, big_sq) if isinstance(t, torch.Tensor)),
                   self._state["ema_g2"].device if self._state else torch.device("cpu"))
        st = self._ensure(dev)
        small = torch.as_tensor(small_sq, dtype=torch.float64, device=dev)
        big = torch.as_tensor(big_sq, dtype=torch.float64, device=dev)
        g2, trace = two_batch_estimates(small, big, b_small, b_big)
        ok = g2.isfinite() & trace.isfinite()
        a = 1.0 - self.beta
        # EMA as lerp on finite steps only; a skipped step keeps the state (no branch, no sync)
        for key, x in (("ema_g2", g2), ("ema_trace", trace), ("ema_weight", torch.ones_like(g2))):
            st[key].copy_(torch.where(ok, st[key] * self.beta + a * x, st[key]))
        st["last_g2"].copy_(g2)
        st["last_trace"].copy_(trace)
        st["steps"].add_(ok.to(torch.float64))

    # -- results -----------------------------------------------------------------------------------
    def _get(self, key: str) -> torch.Tensor:
        if self._state is None:
            return torch.tensor(math.nan, dtype=torch.float64)
        return self._state[key]

    @property
    def b_simple(self) -> torch.Tensor:
        """float64 0-d: ``EMA(tr(Sigma)) / EMA(|G|^2)``, in examples (NaN before any step)."""
        if self._state is None:
            return torch.tensor(math.nan, dtype=torch.float64)
        return self._state["ema_trace"] / self._state["ema_g2"]

    @property
    def gradient_sq(self) -> torch.Tensor:
        """float64 0-d: bias-corrected EMA of the ``|G|^2`` estimates."""
        return self._get("ema_g2") / self._get("ema_weight")

    @property
    def trace(self) -> torch.Tensor:
        """float64 0-d: bias-corrected EMA of the ``tr(Sigma)`` estimates."""
        return self._get("ema_trace") / self._get("ema_weight")

    @property
    def last_gradient_sq(self) -> torch.Tensor:
        return self._get("last_g2")

    @property
    def last_trace(self) -> torch.Tensor:
        return self._get("last_trace")

    @property
    def steps(self) -> torch.Tensor:
        """float64 0-d: the number of finite steps averaged."""
        return self._get("steps")

    def to_dict(self) -> dict[str, float]:
        """Host floats of every result (synchronises)."""
        vals = torch.stack([self.b_simple.cpu(), self.gradient_sq.cpu(), self.trace.cpu(),
                            self.last_gradient_sq.cpu(), self.last_trace.cpu(), self.steps.cpu()]).tolist()
        keys = ("b_simple", "gradient_sq", "trace", "last_gradient_sq", "last_trace", "steps")
        return dict(zip(keys, vals))

    def state_dict(self) -> dict[str, Any]:
        return {"beta": self.beta,
                "state": None if self._state is None else {k: v.clone() for k, v in self._state.items()}}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.beta = float(sd["beta"])
        self._state = None if sd["state"] is None else {k: v.clone() for k, v in sd["state"].items()}

    # -- gradient accumulation -----------------------------------------------------------------------
    @torch.no_grad()
    def first_micro_batch(self, parameters) -> None:
        """Call right after the first micro-batch's ``backward()`` of a step (``.grad`` was zero
        or None before it): records ``|g_1|^2`` of the gradients of ``parameters`` (a Module or
        parameters; one fused pass, no copy, no sync)."""
        self._first_sq = _sq_norm(parameters)

    @torch.no_grad()
    def accumulated(self, parameters=None, *, micro_batch_size: int, micro_batches: int,
                    reduction: str = "mean", total_norm: torch.Tensor | None = None,
                    scale: _Number | None = None) -> None:
        """Call after the last micro-batch's ``backward()``: one step of the estimate.

        What is estimated: B_simple at the current weights from the first micro-batch's gradient
        ``g_1`` (``B_small = micro_batch_size`` examples) against the accumulated gradient of all
        ``micro_batches`` (``B_big = micro_batches * micro_batch_size``).

        Args:
            parameters: a Module or parameters whose ``.grad`` holds the accumulated gradient
                (one fused pass), or None with ``total_norm`` given.
            total_norm: the L2 norm of the accumulated gradient if already computed (e.g. the
                monitor's or clip's ``total_norm``, before clipping); saves the pass.
            reduction: ``"mean"`` if each micro-batch loss was divided by ``micro_batches``
                (``.grad`` is then the mean gradient and ``g_1 = micro_batches * .grad_1``),
                ``"sum"`` if not. B_simple does not depend on it; ``gradient_sq``/``trace`` do.
            scale: a loss scale still in the gradients (e.g. a GradScaler's scale): the squared
                norms are divided by ``scale**2``. B_simple does not depend on a constant one.
        """
        if self._first_sq is None:
            raise RuntimeError("NoiseScale.accumulated() without first_micro_batch() in this step: "
                               "call first_micro_batch(model) after the first micro-batch's backward()")
        k, b = int(micro_batches), int(micro_batch_size)
        if k < 2 or b < 1:
            raise ValueError(f"need micro_batches >= 2 and micro_batch_size >= 1, got {k} and {b}")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        if total_norm is not None:
            big = total_norm.to(torch.float64).square()
        elif parameters is not None:
            big = _sq_norm(parameters)
        else:
            raise ValueError("accumulated() needs parameters or total_norm")
        small = self._first_sq
        self._first_sq = None
        # .grad_1 = c g_1 and .grad_k = c sum_i g_i with c = 1/k ("mean") or 1 ("sum")
        if reduction == "mean":
            small = small * (k * k)
        else:
            big = big / (k * k)
        if scale is not None:
            s2 = torch.as_tensor(scale, dtype=torch.float64, device=big.device).square()
            small, big = small / s2, big / s2
        self.update(small, big, b, k * b)

    # -- DDP -------------------------------------------------------------------------------------------
    def register_ddp_hook(self, ddp_model, *, batch_size: int, hook: Callable | None = None,
                          state: Any = None) -> "DDPNoiseScaleHook":
        """See :func:`register_ddp_hook`."""
        return register_ddp_hook(self, ddp_model, batch_size=batch_size, hook=hook, state=state)

    def register_fsdp_hook(self, modules, *, batch_size: int) -> "FSDPNoiseScaleHook":
        """See :func:`register_fsdp_hook`."""
        return register_fsdp_hook(self, modules, batch_size=batch_size)


class DDPNoiseScaleHook:
    """The DDP communication hook state: per-bucket squared norms before and after the all-reduce.

    Call :meth:`step` once per optimizer step after ``backward()`` (on every rank): it combines
    the buckets in index order (deterministic), averages the local squared norms over the ranks
    (one all-reduce of one float64) and feeds :meth:`NoiseScale.update`.
    """

    def __init__(self, noise_scale: NoiseScale, process_group, batch_size: int,
                 hook: Callable | None, state: Any) -> None:
        import torch.distributed as dist

        if batch_size < 1:
            raise ValueError(f"batch_size (examples per rank per step) must be >= 1, got {batch_size}")
        self.noise_scale = noise_scale
        self.process_group = process_group
        self.world = dist.get_world_size(process_group)
        if self.world < 2:
            raise ValueError("the DDP noise scale needs at least 2 ranks (B_small < B_big)")
        self.batch_size = int(batch_size)
        self._hook = hook
        self._hook_state = state
        self._local: dict[int, torch.Tensor] = {}
        self._reduced: dict[int, torch.Tensor] = {}

    def on_bucket(self, bucket) -> torch.futures.Future:
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        buf = bucket.buffer()
        idx = bucket.index()
        # before the inner hook: the default one divides the buffer by the world size in place
        self._local[idx] = _sq_norm([buf])
        if self._hook is None:
            fut = default_hooks.allreduce_hook(self.process_group, bucket)
        else:
            fut = self._hook(self._hook_state, bucket)

        def after(f):
            out = f.value()
            t = out[0] if isinstance(out, (list, tuple)) else out
            self._reduced[idx] = _sq_norm([t])
            return t

        return fut.then(after)

    @torch.no_grad()
    def step(self) -> None:
        """One step of the estimate from the buckets of the last backward (every rank calls)."""
        import torch.distributed as dist

        if not self._local or len(self._reduced) != len(self._local):
            raise RuntimeError(
                "DDPNoiseScaleHook.step(): no complete all-reduce since the last step "
                "(call it after backward() outside no_sync(), once per optimizer step)")
        keys = sorted(self._local)
        local = torch.stack([self._local[i] for i in keys]).sum()
        big = torch.stack([self._reduced[i] for i in keys]).sum()
        self._local.clear()
        self._reduced.clear()
        local = local.reshape(1)
        dist.all_reduce(local, group=self.process_group)  # SUM (gloo has no AVG)
        small = local[0] / self.world
        self.noise_scale.update(small, big, self.batch_size, self.batch_size * self.world)


def _comm_hook(state: DDPNoiseScaleHook, bucket):
    return state.on_bucket(bucket)


# DDP checks the hook's return annotation as an object (this module's annotations are strings)
_comm_hook.__annotations__ = {"return": torch.futures.Future[torch.Tensor]}


def register_ddp_hook(noise_scale: NoiseScale, ddp_model, *, batch_size: int,
                      hook: Callable | None = None, state: Any = None) -> DDPNoiseScaleHook:
    """Register a DDP communication hook that feeds ``noise_scale``; returns its state object.

    Per bucket: ``|local bucket|^2`` in the fused pass, then the all-reduce (``hook(state,
    bucket)`` if given, e.g. a compression hook; torch's default ``allreduce_hook`` otherwise),
    then ``|reduced bucket|^2`` when its future completes. ``batch_size``: examples per rank in
    one step (with ``no_sync()`` accumulation, all micro-batches of the step). DDP allows one
    communication hook per model. After each step's ``backward()``, call ``returned.step()``.

    The estimate assumes the default mean reduction (the reduced gradient is the mean of the
    ranks' local gradients, each a mean over its ``batch_size`` examples).
    """
    pg = getattr(ddp_model, "process_group", None)
    h = DDPNoiseScaleHook(noise_scale, pg, batch_size, hook, state)
    ddp_model.register_comm_hook(h, _comm_hook)
    return h


class FSDPNoiseScaleHook:
    """An FSDP2 reduce-scatter (duck-typed ``torch.distributed.fsdp`` ``ReduceScatter``) that
    records ``|input|^2`` (the local gradient) and ``|output shard|^2`` (the reduced gradient)
    of every reduce-scatter, then runs the reduce-scatter as FSDP's default does.

    Call :meth:`step` once per optimizer step after ``backward()`` on every rank: one all-reduce
    of two float64 numbers over the reduce-scatter group. Supported reductions: ``AVG`` (FSDP's
    default for float32/bfloat16 gradients) and ``SUM`` (float16/float64 gradients, or
    ``set_force_sum_reduction_for_comms``); the input may then be pre-divided by FSDP, which
    scales both norms alike (B_simple is exact; ``gradient_sq`` and ``trace`` are in the units of
    the reduce-scatter input, i.e. divided by FSDP's pre-divide factor squared). A custom
    ``set_gradient_divide_factor`` (``PREMUL_SUM``) is refused: its factor cannot be read back.
    """

    def __init__(self, noise_scale: NoiseScale, batch_size: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size (examples per rank per step) must be >= 1, got {batch_size}")
        self.noise_scale = noise_scale
        self.batch_size = int(batch_size)
        self._local: list[torch.Tensor] = []
        self._reduced: list[torch.Tensor] = []
        self._group = None
        self._op_avg: bool | None = None

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group, op,
                 async_op: bool = False):
        import torch.distributed as dist

        if op == dist.ReduceOp.AVG:
            avg = True
        elif op == dist.ReduceOp.SUM:
            avg = False
        else:
            raise RuntimeError(
                f"fastgrad FSDP noise scale: reduce-scatter op {op} is not AVG or SUM (a custom "
                "set_gradient_divide_factor?); its scale cannot be read back: remove the divide factor "
                "or the noise-scale hook")
        if self._group is not None and (group is not self._group or avg != self._op_avg):
            raise RuntimeError("fastgrad FSDP noise scale: FSDP groups reduce over different process "
                               "groups or ops; register one hook per reduce-scatter group")
        self._group, self._op_avg = group, avg
        self._local.append(_sq_norm([input_tensor]))
        rs = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor  # FSDP's default
        work = rs(output_tensor, input_tensor, op=op, group=group, async_op=async_op)
        if async_op:  # the norm of the output needs the result: wait (stream-ordered on GPUs)
            work.wait()
        self._reduced.append(_sq_norm([output_tensor]))
        return None if not async_op else work

    @torch.no_grad()
    def step(self) -> None:
        """One step of the estimate from the reduce-scatters of the last backward (every rank)."""
        import torch.distributed as dist

        if not self._local:
            raise RuntimeError("FSDPNoiseScaleHook.step(): no reduce-scatter since the last step (call it "
                               "after backward() with gradient sync on, once per optimizer step)")
        both = torch.stack([torch.stack(self._local).sum(), torch.stack(self._reduced).sum()])
        self._local.clear()
        self._reduced.clear()
        dist.all_reduce(both, group=self._group)
        world = dist.get_world_size(self._group)
        small = both[0] / world  # mean over ranks of |local gradient|^2
        # the output shards together are the mean (AVG) or the sum (SUM) of the ranks' inputs
        big = both[1] if self._op_avg else both[1] / (world * world)
        self.noise_scale.update(small, big, self.batch_size, self.batch_size * world)


def register_fsdp_hook(noise_scale: NoiseScale, modules, *, batch_size: int) -> FSDPNoiseScaleHook:
    """Install one :class:`FSDPNoiseScaleHook` as the reduce-scatter of every FSDP2 module in
    ``modules`` (a Module: all its ``FSDPModule`` submodules, itself included); returns it.

    Requirements: 1-D FSDP or HSDP whose reduce-scatter group has >= 2 ranks; each module one
    FSDP param group (torch refuses custom reduce-scatters with per-parameter meshes); no other
    custom reduce-scatter (this one replaces it). ``batch_size``: examples per rank per step.
    Under HSDP the big batch is the shard group (``shard_size * batch_size``), a valid
    two-batch estimate without the replicate all-reduce. With tensor parallelism each rank's
    input is a TP shard of the gradient: not supported.
    """
    from torch.distributed.fsdp import FSDPModule

    mods = [m for m in (modules.modules() if isinstance(modules, torch.nn.Module) else modules)
            if isinstance(m, FSDPModule)]
    if not mods:
        raise ValueError("register_fsdp_hook: no FSDP2 module (fully_shard) found")
    hook = FSDPNoiseScaleHook(noise_scale, batch_size)
    for m in mods:
        m.set_custom_reduce_scatter(hook)
    return hook

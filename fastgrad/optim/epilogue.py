"""The optimizer step's epilogue: everything a wrapped step computes after the statistics pass, in one call.

With ``n_raw`` the statistics pass's global ``norm_type``-norm of the gradients as the step
received them, ``S`` the GradScaler's scale they still carry (1 without one, or after
``scaler.unscale_``), and ``eps = 1e-6`` (torch's ``clip_grad_norm_``)::

    n         = n_raw * (1 / S)                                  true global norm, float64
    nonfinite = not isfinite(n)
    spike     = SpikeSkip.check(n) and not nonfinite             window += n when finite
    skipped   = (skip_nonfinite and nonfinite) or found_inf > 0 or spike
    update    = not skipped and not nonfinite                    stateful clippers advance only then
    c         = the clipper's coefficient of n                   GlobalNorm, AutoClip, ZClip (fastgrad.clip)
    grad_scale = float32(S / c),  found_inf = float32(skipped)   what a fused optimizer reads
    factor     = c / S, 1 if skipped                             the scaling pass otherwise
    counters  += (1, skipped, nonfinite, spike)
    bad[i]     = non-finite elements of tensor i, on a non-finite step (else kept)

Two implementations of one definition:

* :func:`reference_epilogue`, the float64 torch-op definition: the clippers' own
  ``coefficient`` methods and :class:`fastgrad.optim.SpikeSkip`'s ``check``/``update``. It
  serves every clipper (also user-defined ones) and every device, and is what the fused
  forms are tested against (tests/test_step_epilogue.py).
* :func:`fused_epilogue`, one call for the built-in clippers (none, GlobalNorm, AutoClip,
  ZClip, each with or without SpikeSkip): C++ on the CPU (``_C.step_epilogue``,
  csrc/cpu/step_epilogue_cpu.cpp), one Triton program on a GPU
  (:mod:`fastgrad.step_epilogue_triton`). It is the torch custom op ``fastgrad::step_epilogue``,
  so ``torch.compile`` traces it; eager calls run the op's implementation directly (as
  :mod:`fastgrad.ops` does), which saves the dispatcher's fixed cost and changes nothing else.
  Equal to the reference bitwise except where the reference sums a vector (SpikeSkip's
  window, ZClip's warm-up buffer): torch's summation order differs by a few ulps.

Nothing here reads a tensor on the host.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
import torch

from .. import clip as _clip
from ..spec import ZERO
from .spike import SpikeSkip

try:
    from .. import _C
except ImportError:  # no C++ extension: the reference serves
    _C = None

CLIP_NONE, CLIP_GLOBAL, CLIP_AUTO, CLIP_Z = range(4)  # csrc/cpu/step_epilogue_cpu.h ClipKind
COUNTER_KEYS = ("steps", "skipped_steps", "nonfinite_steps", "spike_steps")


_F64_FIELDS = ("total", "coef", "factor")
_FLAG_FIELDS = ("skipped", "nonfinite", "spike")


class EpilogueResult:
    """One step's decisions (device tensors; nothing read on the host).

    total: float64 0-d true global norm. coef: float64 0-d clip coefficient, or None (no
    folding clipper). factor: float64 0-d ``c / S`` for the scaling pass (1 when neither, or when
    skipped).
    skipped, nonfinite: bool 0-d. spike: bool 0-d, or None without SpikeSkip. grad_scale:
    float32 0-d ``S / c`` (``S`` without a coefficient), or None when there is nothing to divide
    by. found_inf: float32 0-d ``skipped``. bad: int64 ``[T]`` per-tensor non-finite counts of
    the latest non-finite step. host_skipped: ``skipped`` as a Python bool when the decision was
    made on the host (the C++ epilogue on CPU tensors), else None.

    The fused epilogue writes the six values into two small tensors; the 0-d views above are
    made on first access (a step that nobody inspects makes none: each is a host-side op).
    """

    __slots__ = ("_f64", "_flags", "_views", "has_coef", "has_spike", "grad_scale", "found_inf", "bad",
                 "host_skipped")

    def __init__(self, f64, flags, *, has_coef, has_spike, grad_scale, found_inf, bad, host_skipped=None,
                 views=None):
        self._f64, self._flags, self._views = f64, flags, views
        self.has_coef, self.has_spike = has_coef, has_spike
        self.grad_scale, self.found_inf, self.bad, self.host_skipped = grad_scale, found_inf, bad, host_skipped

    @classmethod
    def of(cls, total, coef, factor, skipped, nonfinite, spike, grad_scale, found_inf, bad) -> EpilogueResult:
        """From separate tensors (the reference)."""
        views = {"total": total, "coef": coef, "factor": factor, "skipped": skipped, "nonfinite": nonfinite,
                 "spike": spike}
        return cls(None, None, has_coef=coef is not None, has_spike=spike is not None, grad_scale=grad_scale,
                   found_inf=found_inf, bad=bad, views=views)

    def _view(self, name: str):
        if self._views is None:
            self._views = {**dict(zip(_F64_FIELDS, self._f64.unbind())),
                           **dict(zip(_FLAG_FIELDS, self._flags.unbind()))}
            if not self.has_coef:
                self._views["coef"] = None
            if not self.has_spike:
                self._views["spike"] = None
        return self._views[name]

    total = property(lambda self: self._view("total"))
    coef = property(lambda self: self._view("coef"))
    factor = property(lambda self: self._view("factor"))
    skipped = property(lambda self: self._view("skipped"))
    nonfinite = property(lambda self: self._view("nonfinite"))
    spike = property(lambda self: self._view("spike"))

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in (*_F64_FIELDS, *_FLAG_FIELDS, "grad_scale", "found_inf", "bad")}


@dataclass(frozen=True)
class EpilogueConfig:
    """What the fused epilogue needs to know of a guard, fixed at wrap time (hyper-parameters only)."""

    kind: int
    skip_nonfinite: bool
    inf_norm: bool
    spike_window: int
    spike_sigma: float
    clip_len: int
    max_norm: float
    quantile: float
    alpha: float
    z_thresh: float
    z_eps: float
    z_adaptive: bool

    @property
    def reals(self) -> list[float]:
        """The float64 parameters in the order of the C++ binding and the Triton kernel."""
        return [self.spike_sigma, self.max_norm, self.quantile, self.alpha, self.z_thresh, self.z_eps,
                _clip.EPS, float(self.clip_len)]


def _is_builtin(clipper: _clip.Clipper, cls: type) -> bool:
    """``clipper`` is ``cls`` or a subclass that keeps its coefficient rule."""
    return isinstance(clipper, cls) and type(clipper).coefficient is cls.coefficient


def config_for(clipper: _clip.Clipper | None, spike_skip: SpikeSkip | None, skip_nonfinite: bool,
               norm_type: float) -> EpilogueConfig | None:
    """The fused epilogue's configuration, or None when only the reference can serve (a folding
    clipper whose rule the fused kernels do not know, e.g. a user-defined one)."""
    kw = dict(spike_window=0, spike_sigma=0.0, clip_len=0, max_norm=math.inf, quantile=0.0, alpha=0.0,
              z_thresh=0.0, z_eps=0.0, z_adaptive=True)
    if spike_skip is not None:
        kw.update(spike_window=spike_skip.window, spike_sigma=spike_skip.sigma)
    if clipper is None or not clipper.folds:
        kind = CLIP_NONE  # non-folding clippers write the gradients themselves
    elif _is_builtin(clipper, _clip.GlobalNorm):
        kind = CLIP_GLOBAL
        kw.update(max_norm=clipper.max_norm)
    elif _is_builtin(clipper, _clip.AutoClip):
        kind = CLIP_AUTO
        kw.update(clip_len=clipper.history, quantile=clipper.percentile / 100.0)  # as AutoClip.threshold
    elif _is_builtin(clipper, _clip.ZClip):
        kind = CLIP_Z
        kw.update(clip_len=clipper.warmup, alpha=clipper.alpha, z_thresh=clipper.z_thresh, z_eps=clipper.eps,
                  z_adaptive=clipper.mode == "adaptive",
                  max_norm=math.inf if clipper.max_norm is None else clipper.max_norm)
    else:
        return None
    return EpilogueConfig(kind=kind, skip_nonfinite=skip_nonfinite, inf_norm=math.isinf(norm_type), **kw)


# ----------------------------------------------------------------------------------------------
# The reference: torch ops, float64
# ----------------------------------------------------------------------------------------------


def reference_epilogue(stats, amp_scale: torch.Tensor | None, amp_found: torch.Tensor | None, *,
                       skip_nonfinite: bool, clipper: _clip.Clipper | None, spike_skip: SpikeSkip | None,
                       counters: dict[str, torch.Tensor], bad: torch.Tensor,
                       ctx_items: tuple = ((), (), ())) -> EpilogueResult:
    """The epilogue's definition in torch ops (see the module docstring), state updated as the
    clippers and :class:`SpikeSkip` define it; ``counters`` are incremented in place.
    ``ctx_items`` = ``(params, grads, names)`` for the clipper's :class:`fastgrad.clip.ClipContext`."""
    dev = stats.raw.floats.device
    inv = None if amp_scale is None else 1.0 / amp_scale.to(dev, torch.float64)
    total = stats.total_norm if inv is None else stats.total_norm * inv
    nonfinite = ~total.isfinite()
    skip = torch.zeros((), dtype=torch.bool, device=dev)
    if skip_nonfinite:
        skip = skip | nonfinite
    if amp_found is not None:
        skip = skip | (amp_found.to(dev) > 0)
    spike = None
    if spike_skip is not None:
        spike = spike_skip.check(total) & ~nonfinite
        spike_skip.update(total, ~nonfinite)
        skip = skip | spike
    update = ~skip & ~nonfinite
    coef = None
    if clipper is not None and clipper.folds:
        tensor_norms = stats.tensor_norms if inv is None else stats.tensor_norms * inv
        coef = clipper.coefficient(_clip.ClipContext(*ctx_items, total, tensor_norms, inv, update))
    counters["steps"] += 1
    counters["skipped_steps"] += skip
    counters["nonfinite_steps"] += nonfinite
    if spike is not None:
        counters["spike_steps"] += spike
    bad = torch.where(nonfinite, stats.nonfinite_count, bad)
    if coef is None:
        factor = torch.ones((), dtype=torch.float64, device=dev) if inv is None else inv
        grad_scale = None if amp_scale is None else amp_scale.to(torch.float32)
    else:
        factor = coef if inv is None else coef * inv
        s = 1.0 if amp_scale is None else amp_scale.to(coef.device, torch.float64)
        grad_scale = (s / coef).to(torch.float32)  # the fused kernels read grad_scale as float32
    factor = torch.where(skip, 1.0, factor)  # the scaling pass runs before the skip is read on the host
    return EpilogueResult.of(total, coef, factor, skip, nonfinite, spike, grad_scale, skip.to(torch.float32),
                             bad)


# ----------------------------------------------------------------------------------------------
# The fused form: one C++ call (CPU) or one Triton program (GPU), as a torch custom op
# ----------------------------------------------------------------------------------------------


def fused_why_not(device: torch.device, impl: str | None = None) -> str | None:
    """None if the fused epilogue can run on ``device`` (with ``impl`` "cpu" / "triton", or the
    automatic choice), else the reason."""
    kind = impl or ("cpu" if device.type == "cpu" else "triton" if device.type == "cuda" else None)
    if kind == "cpu":
        if device.type != "cpu":
            return f"the C++ epilogue takes CPU tensors, not {device}"
        if _C is None or not hasattr(_C, "step_epilogue"):
            return "fastgrad._C has no step_epilogue (rebuild the extension)"
        return None
    if kind == "triton":
        k = _triton()
        if k is None:
            return "Triton is not importable"
        if k.INTERPRETED != (device.type == "cpu"):
            return ("the Triton epilogue was defined " + ("interpreted (TRITON_INTERPRET=1): CPU tensors only"
                                                          if k.INTERPRETED else "compiled: GPU tensors only"))
        return None
    return f"no fused epilogue for {device.type} tensors"


_triton_module = None


def _triton():
    global _triton_module
    if _triton_module is None:
        try:
            from .. import step_epilogue_triton
        except Exception:  # noqa: BLE001 - any import failure means: not available
            return None
        _triton_module = step_epilogue_triton
    return _triton_module


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _run(total_row, total_counts, tensor_counts, bad, amp_scale, amp_found, counters, spike, clip, fold_out,
         ints, reals, reals_list, impl):
    """The op's implementation: fresh outputs, then one C++ call or one Triton launch."""
    dev = total_row.device
    out_f64 = torch.empty(3, dtype=torch.float64, device=dev)
    out_bool = torch.empty(3, dtype=torch.bool, device=dev)
    if impl == "cpu" or (impl is None and dev.type == "cpu"):
        if clip and ints[7] == CLIP_Z:  # (buffer, seen, mean, var) -> the binding's (buf, count, pos, mean, var)
            cl = [clip[0].data_ptr(), clip[1].data_ptr(), 0, clip[2].data_ptr(), clip[3].data_ptr()]
        else:
            cl = [t.data_ptr() for t in clip] + [0] * (5 - len(clip))
        sp = [t.data_ptr() for t in spike] if spike else [0, 0, 0]
        host_skipped = _C.step_epilogue(
            [total_row.data_ptr(), total_counts.data_ptr(), tensor_counts.data_ptr(), bad.data_ptr(),
             _ptr(amp_scale), _ptr(amp_found), counters.data_ptr(), *sp, *cl,
             out_f64.data_ptr(), out_bool.data_ptr(), fold_out.data_ptr()],
            ints, (reals_list if reals_list is not None else reals.tolist())[:6])  # the C++ needs no eps/len
    else:
        host_skipped = None  # on the device: reading it would wait for the stream
        _triton().step_epilogue(total_row, total_counts, tensor_counts, bad, amp_scale, amp_found, counters,
                                spike, clip, out_f64, out_bool, fold_out, tuple(ints), reals)
    return out_f64, out_bool, host_skipped


@torch.library.custom_op("fastgrad::step_epilogue",
                         mutates_args=("bad", "counters", "spike", "clip", "fold_out"))
def _step_epilogue_op(
    total_row: torch.Tensor, total_counts: torch.Tensor, tensor_counts: torch.Tensor, bad: torch.Tensor,
    amp_scale: torch.Tensor | None, amp_found: torch.Tensor | None, counters: torch.Tensor,
    spike: list[torch.Tensor], clip: list[torch.Tensor], fold_out: torch.Tensor, ints: list[int],
    reals: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(float64 [3] (total, coef, factor), bool [3] (skipped, nonfinite, spike))``; state,
    counters, ``bad`` and ``fold_out`` (float32 [2]: grad_scale, found_inf) updated in place."""
    return _run(total_row, total_counts, tensor_counts, bad, amp_scale, amp_found, counters, spike, clip,
                fold_out, ints, reals, None, None)[:2]


@_step_epilogue_op.register_fake
def _(total_row, total_counts, tensor_counts, bad, amp_scale, amp_found, counters, spike, clip, fold_out, ints,
      reals):
    dev = total_row.device
    return torch.empty(3, dtype=torch.float64, device=dev), torch.empty(3, dtype=torch.bool, device=dev)


class FusedState:
    """The device-side pieces the fused epilogue writes, per guard: the counters (one int64 [4]
    buffer; ``counters`` holds 0-d views of it, so in-place updates show through), the float32
    [2] ``(grad_scale, found_inf)`` buffer handed to fused optimizers (reused: read within the
    step), and the float64 parameters on the device (for the Triton kernel)."""

    def __init__(self) -> None:
        self.buffer: torch.Tensor | None = None
        self.counters: dict[str, torch.Tensor] | None = None
        self.fold: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._reals: dict[torch.device, torch.Tensor] = {}
        self.binding: tuple | None = None  # the CPU call's fixed part (see _cpu_binding)

    def __getstate__(self) -> dict:
        # the binding holds raw pointers into *these* tensors: a copy (deepcopy, pickle) that kept
        # it would have the C++ epilogue write the original's counters and fold buffer
        state = self.__dict__.copy()
        state["binding"] = None
        return state

    def ensure(self, device: torch.device) -> dict[str, torch.Tensor]:
        if self.buffer is None:
            self.set_counters(torch.zeros(len(COUNTER_KEYS), dtype=torch.int64, device=device))
        elif self.buffer.device != device:
            self.set_counters(self.buffer.to(device))
        return self.counters

    def set_counters(self, buffer: torch.Tensor) -> None:
        self.buffer = buffer
        self.counters = dict(zip(COUNTER_KEYS, buffer.unbind()))
        self.fold = None
        self.binding = None

    def fold_out(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.fold is None or self.fold[0].device != device:
            buf = torch.zeros(2, dtype=torch.float32, device=device)
            self.fold = (buf, *buf.unbind())
        return self.fold

    def reals(self, cfg: EpilogueConfig, device: torch.device) -> torch.Tensor:
        t = self._reals.get(device)
        if t is None:
            t = self._reals[device] = torch.tensor(cfg.reals, dtype=torch.float64, device=device)
        return t


def _state_lists(cfg: EpilogueConfig, clipper, spike_skip, device) -> tuple[list, list]:
    spike = []
    if spike_skip is not None:
        spike_skip._ensure(device)
        spike = [spike_skip.buffer, spike_skip.count, spike_skip.pos]
    clip = []
    if cfg.kind == CLIP_AUTO:
        clipper._ensure(device)
        clip = [clipper.buffer, clipper.count, clipper.pos]
    elif cfg.kind == CLIP_Z:
        clipper._ensure(device)
        clip = [clipper.buffer, clipper.seen, clipper.mean, clipper.var]
    return spike, clip


def epilogue_ints(cfg: EpilogueConfig, num_float_cols: int, rows: int, counts_stride: int) -> list[int]:
    """The epilogue's ten ints, one list for the C++ call, the Triton program and the custom op
    (csrc/bindings.cpp, step_epilogue): the norm column, the max column (the floats table's last),
    the per-tensor count rows and their stride, the first non-finite column, then the configuration."""
    return [-1 if cfg.inf_norm else 0, num_float_cols - 1, rows, counts_stride, ZERO, int(cfg.skip_nonfinite),
            cfg.spike_window, cfg.kind, cfg.clip_len, int(cfg.z_adaptive)]


def fused_epilogue(cfg: EpilogueConfig, stats, amp_scale: torch.Tensor | None, amp_found: torch.Tensor | None,
                   *, clipper, spike_skip: SpikeSkip | None, state: FusedState, bad: torch.Tensor,
                   impl: str | None = None) -> EpilogueResult:
    """:func:`reference_epilogue` in one call (see the module docstring): the custom op while
    compiling, its implementation directly in eager mode. ``state.ensure(device)`` must have run."""
    total = stats.total.raw
    if impl is None and amp_scale is None and amp_found is None and not torch.compiler.is_compiling():
        fast = _cpu_fast(cfg, stats, total, clipper, spike_skip, state, bad)
        if fast is not None:
            return fast
    dev = total.floats.device
    total_row, total_counts = total.floats, total.counts  # [1, P + 1], [1, C]: pointers, no views
    counts = stats.raw.counts
    if counts.stride(-1) != 1:
        counts = counts.contiguous()
    if amp_scale is not None and (amp_scale.dtype != torch.float32 or amp_scale.device != dev):
        amp_scale = amp_scale.to(dev, torch.float32)
    if amp_found is not None and (amp_found.dtype != torch.float32 or amp_found.device != dev):
        amp_found = amp_found.to(dev, torch.float32)
    spike, clip = _state_lists(cfg, clipper, spike_skip, dev)
    fold, grad_scale, found_inf = state.fold_out(dev)
    ints = epilogue_ints(cfg, total_row.shape[-1], counts.shape[0], counts.stride(0))
    if torch.compiler.is_compiling():
        out_f64, out_bool = torch.ops.fastgrad.step_epilogue(
            total_row, total_counts, counts, bad, amp_scale, amp_found, state.buffer, spike, clip, fold, ints,
            state.reals(cfg, dev))
        host_skipped = None
    else:
        use_cpu = (impl or dev.type) == "cpu"
        out_f64, out_bool, host_skipped = _run(
            total_row, total_counts, counts, bad, amp_scale, amp_found, state.buffer, spike, clip, fold, ints,
            None if use_cpu else state.reals(cfg, dev), cfg.reals if use_cpu else None, impl)
    has_coef = cfg.kind != CLIP_NONE
    return EpilogueResult(out_f64, out_bool, has_coef=has_coef, has_spike=spike_skip is not None,
                          grad_scale=grad_scale if (has_coef or amp_scale is not None) else None,
                          found_inf=found_inf, bad=bad, host_skipped=host_skipped)


def _state_now(clipper, spike_skip) -> tuple:
    """The state tensors as they are now (identity decides whether the cached pointers still hold)."""
    keys = getattr(clipper, "_state_keys", ())
    if spike_skip is None and not keys:  # GlobalNorm / no clipper: nothing to compare
        return ()
    sp = () if spike_skip is None else (spike_skip.buffer, spike_skip.count, spike_skip.pos)
    return sp + tuple(getattr(clipper, k, None) for k in keys)


def _cpu_binding(cfg, clipper, spike_skip, state: FusedState):
    """The fixed part of the C++ call for CPU state: pointers of counters, spike and clipper state
    and the fold buffer, rebuilt only when one of those tensors was replaced (first step, a load,
    a move)."""
    now = _state_now(clipper, spike_skip)
    b = state.binding
    if b is not None and b[0] is state.buffer and (b[1] == () if not now else len(b[1]) == len(now) and all(
            x is y for x, y in zip(b[1], now))):
        return b
    cpu = torch.device("cpu")
    if state.buffer is None or state.buffer.device != cpu:
        return None
    spike, clip = _state_lists(cfg, clipper, spike_skip, cpu)
    if clip and cfg.kind == CLIP_Z:
        cl = [clip[0].data_ptr(), clip[1].data_ptr(), 0, clip[2].data_ptr(), clip[3].data_ptr()]
    else:
        cl = [t.data_ptr() for t in clip] + [0] * (5 - len(clip))
    sp = [t.data_ptr() for t in spike] if spike else [0, 0, 0]
    fold, grad_scale, found_inf = state.fold_out(cpu)
    mid = [state.buffer.data_ptr(), *sp, *cl]
    state.binding = (state.buffer, _state_now(clipper, spike_skip), mid, fold.data_ptr(), grad_scale, found_inf,
                     cfg.reals[:6])
    return state.binding



def _cpu_fast(cfg, stats, total, clipper, spike_skip, state: FusedState, bad) -> EpilogueResult | None:
    """The eager CPU call without a GradScaler, with its fixed part cached: the common step's host
    cost is the C++ call, two small allocations and a few pointer reads. None: take the general path."""
    floats = total.floats
    if not floats.is_cpu or _C is None:
        return None
    b = _cpu_binding(cfg, clipper, spike_skip, state)
    if b is None:
        return None
    counts = stats.raw.counts
    stride = counts.stride()
    if stride[-1] != 1:
        return None
    _, _, mid, fold_ptr, grad_scale, found_inf, reals = b
    out_f64 = torch.empty(3, dtype=torch.float64)
    out_bool = torch.empty(3, dtype=torch.bool)
    host_skipped = _C.step_epilogue(
        [floats.data_ptr(), total.counts.data_ptr(), counts.data_ptr(), bad.data_ptr(), 0, 0, *mid,
         out_f64.data_ptr(), out_bool.data_ptr(), fold_ptr],
        epilogue_ints(cfg, floats.shape[-1], counts.shape[0], stride[0]), reals)
    has_coef = cfg.kind != CLIP_NONE
    return EpilogueResult(out_f64, out_bool, has_coef=has_coef, has_spike=spike_skip is not None,
                          grad_scale=grad_scale if has_coef else None, found_inf=found_inf, bad=bad,
                          host_skipped=host_skipped)

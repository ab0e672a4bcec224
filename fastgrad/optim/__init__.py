"""Drop-in optimizer integration: clipping folded into the step, sync-free skip of bad steps.

One line changes, everything else (LR schedulers, GradScaler, checkpoints,
trainers) stays::

    opt = fastgrad.wrap(torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True),
                        max_norm=1.0, model=model)

Each ``step()``:

1. reads every gradient once (:func:`fastgrad.grad_stats`: global and
   per-tensor norms, non-finite counts; extra statistics when a monitor asks),
2. computes, in one fused call on the device (:mod:`fastgrad.optim.epilogue`: C++ on the
   CPU, one Triton program on a GPU), the true norm, the clip coefficient
   (:mod:`fastgrad.clip`), whether to skip the step (non-finite gradients, a GradScaler's
   ``found_inf``, an optional norm spike), the clipper's and spike detector's state and the
   counters,
3. applies both without an extra pass where the optimizer allows it.

Two paths, chosen per optimizer:

**Folded** (torch's fused Adam, AdamW, SGD, Adagrad: ``fused=True``). The clip coefficient
``c`` and the skip flag ride on the GradScaler protocol these kernels read
(:mod:`fastgrad.optim.folding`)::

    grad_scale = S / c        (S = the GradScaler's scale if it has not unscaled, else 1)
    found_inf  = 1.0 if (non-finite | GradScaler found_inf | spike) else 0.0

so clipping and skipping cost no pass over the gradients and no host read.

**Scaled** (every other optimizer, and per-tensor / element-wise / unit-wise
clippers): one fused multiply by ``c / S`` (:func:`fastgrad.ops.scale_op_`,
which writes nothing when that is exactly 1), then ``step()``. Skipping needs
the decision on the host: at most one read of one 0-d flag per step, as
GradScaler does, and none at all when nothing can cause a skip
(``skip_nonfinite=False``, no GradScaler, no spike detection). A skipped step
calls nothing: parameters, optimizer state and step counts are unchanged.
Per-tensor clippers with a fused optimizer write the gradients and still skip
through ``found_inf``.

``.grad`` after a step: when the step is applied, ``.grad`` holds the clipped gradient with any
GradScaler scale divided out, on both paths (the scaled path multiplies it before ``step()``;
torch's fused kernels write back the gradient they used, ``g * c / S``). When the step is
skipped, ``.grad`` is left as the step received it — except that per-tensor, element-wise and
unit-wise clippers (PerTensorNorm, Value, AGC) with a fused optimizer have already written
their clipped values, since the skip is decided on the device.

With a GradScaler (``torch.amp.GradScaler``, CUDA or CPU): the wrapper
declares ``_step_supports_amp_scaling``, so ``scaler.step(opt)`` hands it
``grad_scale = S`` and ``found_inf`` instead of unscaling the gradients
itself (when ``scaler.unscale_(opt)`` ran first, ``grad_scale`` is None and
the gradients are already true). Norms are divided by ``S`` before
clipping, so thresholds apply to true gradients, as in the documented
``unscale_`` + ``clip_grad_norm_`` + ``step`` recipe; ``scaler.update()``
still sees only its own ``found_inf`` (spike skips do not shrink the scale).

After each step ``optimizer.last_stats`` is a :class:`StepStats` of device
tensors; reading them is the caller's choice of when to synchronise.

Modules: :mod:`~fastgrad.optim.options` (the validated arguments, shared by ``wrap`` and
``attach``), :mod:`~fastgrad.optim.names` (which parameters, and their names),
:mod:`~fastgrad.optim.guard` (one step's stages), :mod:`~fastgrad.optim.epilogue` (the fused
decisions and their float64 reference), :mod:`~fastgrad.optim.spike` (SpikeSkip),
:mod:`~fastgrad.optim.folding` (the fused-optimizer protocol), :mod:`~fastgrad.optim.wrapper`
(``wrap``), :mod:`~fastgrad.optim.attachment` (``attach`` / ``detach``).
"""

from ..stats import grad_stats  # the statistics seam of the guard (looked up here at call time)
from .spike import SpikeSkip
from .options import GuardOptions
from .guard import Guard, StepStats
from .wrapper import FastgradOptimizer, wrap
from .attachment import Attachment, attach, detach

__all__ = ["Attachment", "FastgradOptimizer", "GuardOptions", "SpikeSkip", "StepStats", "attach", "detach",
           "wrap"]

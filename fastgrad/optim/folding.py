"""Folding the clip and the skip into a fused optimizer's own kernel (the GradScaler protocol).

torch's fused Adam, AdamW, SGD and Adagrad (``fused=True``) read two optional attributes
before their kernel runs: ``optimizer.grad_scale`` (every gradient is divided by it inside the
update) and ``optimizer.found_inf`` (1.0 skips the whole update on the device; the step counts
are incremented and then decremented by it). A global clip coefficient ``c`` rides on the
first, the skip decision on the second::

    grad_scale = S / c        (S = the GradScaler's scale if it has not unscaled, else 1)
    found_inf  = 1.0 if (non-finite | GradScaler found_inf | spike) else 0.0

so clipping and skipping cost no pass over the gradients and no host read.

What ``.grad`` holds afterwards (measured on torch 2.13, CPU; the CUDA kernels store the
gradient back on the same condition): when the update is applied, torch's fused kernels write
the gradient they used, ``g / grad_scale = g * c / S``, back into ``.grad``. So after an applied
step ``.grad`` holds the clipped, unscaled gradient on the folded path, exactly as on the
scaling path (which multiplies ``.grad`` by ``c / S`` before ``step()``). After a skipped step
``.grad`` is left as the step received it, on both paths.
"""

from __future__ import annotations

import torch


def folds_into_kernel(opt: torch.optim.Optimizer) -> bool:
    """True for optimizers whose step reads ``grad_scale`` / ``found_inf`` (torch's fused ones)."""
    if not getattr(opt, "_step_supports_amp_scaling", False):
        return False
    fused = opt.defaults.get("fused") and all(g.get("fused", True) for g in opt.param_groups)
    # torch's own fused optimizers are the ones known to read the attributes and to undo
    # their step counts by found_inf; a custom optimizer that merely declares the flag may
    # expect the older ``grad_scaler=`` keyword instead.
    return bool(fused) and type(opt).__module__.startswith("torch.optim")


def folded_step(inner: torch.optim.Optimizer, grad_scale: torch.Tensor | None,
                found_inf: torch.Tensor | None) -> None:
    """``inner.step()`` with ``grad_scale`` / ``found_inf`` set for this call only (None: not set)."""
    d = inner.__dict__
    if grad_scale is not None:
        d["grad_scale"] = grad_scale
    if found_inf is not None:
        d["found_inf"] = found_inf
    try:
        inner.step()
    finally:
        d.pop("grad_scale", None)
        d.pop("found_inf", None)

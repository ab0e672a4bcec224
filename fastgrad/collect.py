"""Turn what the user passed (a module, parameters, named parameters, gradients) into named gradients."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class Collected(NamedTuple):
    names: list[str]
    grads: list[torch.Tensor]


def _is_param(t: torch.Tensor) -> bool:
    # A parameter (or any tensor that takes gradients) stands for its .grad;
    # anything else is taken to be a gradient itself, as torch's get_total_norm does.
    # (isinstance against Parameter's metaclass costs ~200 ns: test the cheap things first.)
    return t.requires_grad or (type(t) is not torch.Tensor and isinstance(t, torch.nn.Parameter))


_index_names: list[str] = []
_PLAIN = {torch.Tensor, torch.nn.Parameter}


def index_names(n: int) -> list[str]:
    """``["[0]", ..., "[n-1]"]``, built once and reused (names of unnamed tensors)."""
    if len(_index_names) < n:
        _index_names.extend(f"[{i}]" for i in range(len(_index_names), n))
    return _index_names[:n]


def collect(obj, names: Sequence[str] | None = None) -> Collected:
    """Named gradients from a Module, a tensor, or an iterable of tensors / (name, tensor) pairs.

    Parameters whose ``.grad`` is None are skipped (as torch does). Unnamed
    items are called ``[i]`` after their position in ``obj``.
    """
    if isinstance(obj, torch.nn.Module):
        items: list = list(obj.named_parameters())
    elif isinstance(obj, torch.Tensor):
        items = [obj]
    elif isinstance(obj, Iterable):
        items = list(obj)
    else:
        raise TypeError(
            f"expected a torch.nn.Module, a Tensor or an iterable of tensors, got {type(obj).__name__}"
        )
    if names is not None:
        names = list(names)
        if len(names) != len(items):
            raise ValueError(f"names has {len(names)} entries but {len(items)} tensors were given")
    if names is None:
        names = index_names(len(items))
    if {type(t) for t in items} <= _PLAIN:  # fast path: tensors and parameters, no pairs
        gs = [t.grad if t.requires_grad or type(t) is not torch.Tensor else t for t in items]
        if any(g is None for g in gs):
            keep = [i for i, g in enumerate(gs) if g is not None]
            return Collected([names[i] for i in keep], [gs[i] for i in keep])
        return Collected(list(names), gs)
    out_names: list[str] = []
    grads: list[torch.Tensor] = []
    for name, item in zip(names, items):
        if type(item) is tuple and len(item) == 2 and isinstance(item[0], str):
            name, item = item
        if not isinstance(item, torch.Tensor):
            raise TypeError(f"{name}: expected a Tensor, got {type(item).__name__}")
        g = item.grad if _is_param(item) else item
        if g is not None:
            out_names.append(name)
            grads.append(g)
    return Collected(out_names, grads)


def check_grads(names: Sequence[str], grads: Sequence[torch.Tensor]) -> None:
    """Raise a clear error for gradients no backend can read; writes nothing."""
    kinds = {(g.dtype, g.layout) for g in grads}
    if all(dt in SUPPORTED_DTYPES and lay == torch.strided for dt, lay in kinds):
        return
    for name, g in zip(names, grads):
        if g.layout != torch.strided:
            raise RuntimeError(
                f"gradient of {name} has layout {g.layout}; fastgrad reads dense (strided) "
                "gradients only: convert it with .to_dense() first"
            )
        if g.dtype not in SUPPORTED_DTYPES:
            what = "complex" if g.dtype.is_complex else "non-floating"
            hint = (
                " (use torch.view_as_real to read it as a float tensor)"
                if g.dtype.is_complex
                else ""
            )
            raise TypeError(
                f"gradient of {name} has {what} dtype {g.dtype}; fastgrad supports "
                f"float16, bfloat16, float32 and float64{hint}"
            )


def promoted_dtype(grads: Iterable[torch.Tensor]) -> torch.dtype:
    """The dtype torch's ``get_total_norm`` returns: the promotion of all gradient dtypes."""
    dtype = None
    for g in grads:
        dtype = g.dtype if dtype is None else torch.promote_types(dtype, g.dtype)
    return dtype or torch.get_default_dtype()

"""Collect: turn what the user passed (a module, parameters, named parameters, gradients) into
named gradients, and say what is wrong with bad input. The first stage of every call.

Which tensors are parameters: a ``torch.nn.Parameter``, or a *leaf* tensor that requires
grad, stands for its ``.grad`` (skipped when None, as torch does). Every other tensor is
a gradient itself — including gradients that carry a graph (``backward(create_graph=True)``,
gradient penalties, MAML), which require grad but are not leaves.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch

from .spec import SUPPORTED_DTYPES


class Collected(NamedTuple):
    names: list[str]
    grads: list[torch.Tensor]
    params: list[torch.Tensor] | None = None  # with_params=True: the parameter of each gradient


def _is_param(t: torch.Tensor) -> bool:
    # (isinstance against Parameter's metaclass costs ~200 ns: test the cheap things first.)
    if type(t) is torch.Tensor:
        return t.requires_grad and t.is_leaf
    return isinstance(t, torch.nn.Parameter) or (t.requires_grad and t.is_leaf)


_index_names: list[str] = []
_PLAIN = {torch.Tensor, torch.nn.Parameter}


def index_names(n: int) -> list[str]:
    """``["[0]", ..., "[n-1]"]``, built once and reused (names of unnamed tensors)."""
    if len(_index_names) < n:
        _index_names.extend(f"[{i}]" for i in range(len(_index_names), n))
    return _index_names[:n]


def collect(obj, names: Sequence[str] | None = None, with_params: bool = False) -> Collected:
    """Named gradients from a Module, a tensor, or an iterable of tensors / (name, tensor) pairs.

    Parameters whose ``.grad`` is None are skipped (as torch does). Unnamed
    items are called ``[i]`` after their position in ``obj``. ``with_params``:
    also the parameter each gradient belongs to (``ValueError`` for bare gradients,
    which have none).
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
    if with_params:
        fast = _collect_parameters(items, names)
        return fast if fast is not None else _collect_items(items, names, with_params=True)
    if {type(t) for t in items} <= _PLAIN:  # fast path: tensors and parameters, no pairs
        gs = [t.grad if type(t) is not torch.Tensor or (t.requires_grad and t.is_leaf) else t
              for t in items]
        if any(g is None for g in gs):
            keep = [i for i, g in enumerate(gs) if g is not None]
            _warn_if_empty(len(items), len(keep), 4)
            return Collected([names[i] for i in keep], [gs[i] for i in keep])
        _warn_if_empty(len(items), len(gs), 4)
        return Collected(list(names), gs)
    return _collect_items(items, names, with_params=False)


def _collect_parameters(items: list, names: Sequence[str]) -> Collected | None:
    """:func:`collect` with ``with_params`` for the common input — every item an exact
    ``torch.nn.Parameter``, or every item a ``(str, Parameter)`` pair (a Module's
    ``named_parameters()``) — in a few list passes; None for anything else (the general form).

    The weights are the parameters themselves: the backends' plain readers take exact
    ``Parameter`` objects where they only read (csrc/common/plain_reader.h), so no per-weight
    ``detach()`` is made — creating 10,000 tensor objects (and the garbage collections they
    trigger) cost more than the rest of a ``grad_stats(params=True)`` call. Nothing records
    autograd history from them: the fast passes read raw memory, and the general path's
    backends read raw memory too or detach (:mod:`fastgrad.reference`). Traced by
    ``torch.compile``: ``detach()`` (custom ops take no inputs that require grad).
    """
    if not items:
        return None
    ps = items
    kinds = {type(t) for t in items}
    if kinds == _PAIR:
        if {len(it) for it in items} != _TWO:
            return None
        names, ps = [it[0] for it in items], [it[1] for it in items]  # (zip(*items): an iterator per item)
        if {type(n) for n in names} != _STR:
            return None
        kinds = {type(p) for p in ps}
    if kinds != _PARAMETER:
        return None
    gs = [p.grad for p in ps]
    if any(g is None for g in gs):
        keep = [i for i, g in enumerate(gs) if g is not None]
        names, ps, gs = [names[i] for i in keep], [ps[i] for i in keep], [gs[i] for i in keep]
    _warn_if_empty(len(items), len(gs), 5)
    ws = [p.detach() for p in ps] if torch.compiler.is_compiling() else list(ps)
    return Collected(list(names), gs, ws)


_PAIR, _TWO, _STR, _PARAMETER = {tuple}, {2}, {str}, {torch.nn.Parameter}


def _collect_items(items: list, names: Sequence[str], with_params: bool) -> Collected:
    """The general form of :func:`collect`: ``(name, tensor)`` pairs and mixed items, one by one."""
    out_names: list[str] = []
    grads: list[torch.Tensor] = []
    params: list[torch.Tensor] = []
    for name, item in zip(names, items):
        if type(item) is tuple and len(item) == 2 and isinstance(item[0], str):
            name, item = item
        if not isinstance(item, torch.Tensor):
            raise TypeError(f"{name}: expected a Tensor, got {type(item).__name__}")
        is_param = _is_param(item)
        if with_params and not is_param:
            raise ValueError(
                f"{name}: params=True reads each gradient's parameter, but this is a gradient tensor "
                "(not a Parameter or a leaf that requires grad); pass the module or its parameters"
            )
        g = item.grad if is_param else item
        if g is not None:
            out_names.append(name)
            grads.append(g)
            if with_params:
                params.append(item.detach())
    _warn_if_empty(len(items), len(grads), 5)
    return Collected(out_names, grads, params if with_params else None)


def _warn_if_empty(given: int, kept: int, stacklevel: int) -> None:
    """Never return an empty result silently (torch warns for an empty ``parameters`` too).
    ``stacklevel``: frames up to the user's call of the public function (via ``collect``)."""
    if kept:
        return
    what = ("no tensors were given" if not given else
            f"all {given} parameters given have .grad None (call backward() first?)")
    warnings.warn(f"fastgrad: no gradients to read: {what}; the statistics are empty", stacklevel=stacklevel)


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


def check_writable(tensors: Sequence[torch.Tensor], names: Sequence[str] | None = None) -> None:
    """Raise (as torch's in-place ops do) before writing to a tensor whose elements share memory,
    e.g. an ``expand``-ed gradient: scaling it would scale one location once per alias."""
    for i, t in enumerate(tensors):
        if not t.is_contiguous() and torch._debug_has_internal_overlap(t) == 1:
            name = names[i] if names is not None else f"[{i}]"
            raise RuntimeError(
                f"gradient {name} (shape {tuple(t.shape)}, stride {t.stride()}): more than one element "
                "of the written-to tensor refers to a single memory location, so it cannot be scaled "
                "or clamped in place. Please clone() the gradient (p.grad = p.grad.clone()) first."
            )

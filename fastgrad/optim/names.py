"""Which parameters a step clips, and their names: the collector of the wrapped step.

Names come, in order of preference, from the model (``model=`` or a monitor's module, read
from the module as it is *now*: a layer added after ``wrap`` is named once its parameters
reach the optimizer), from ``param_names`` of a group built from ``named_parameters()``,
or from the position, ``param_groups[g][i]``. The flat list is rebuilt only when the groups
change (``add_param_group``, a replaced ``param_groups`` list).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class ModelNames:
    """``id(parameter) -> name`` of a module, refreshed from the module when a parameter is unknown."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self._by_id = self._read()

    def _read(self) -> dict[int, str]:
        return {id(q): n for n, q in self.model.named_parameters()}

    def get(self, p: torch.Tensor) -> str | None:
        name = self._by_id.get(id(p))
        if name is None:
            self._by_id = self._read()  # the model may have grown since
            name = self._by_id.get(id(p))
        return name

    def foreign(self, params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
        """The parameters of ``params`` that are not (now) parameters of the model."""
        params = list(params)
        if any(id(q) not in self._by_id for q in params):
            self._by_id = self._read()
        return [q for q in params if id(q) not in self._by_id]


class ParamIndex:
    """The flat parameter list of an optimizer's groups and their names, cached per group layout."""

    def __init__(self, model: torch.nn.Module | None) -> None:
        self.model_names = None if model is None else ModelNames(model)
        self._groups: list[dict] | None = None  # the param_groups list the flat list was built from
        self._lists: list[tuple[list, int]] = []  # each group's params list and its length then
        self.params: list[torch.Tensor] = []
        self.names: list[str] = []

    def __setstate__(self, state: dict) -> None:  # indexes pickled before _groups existed rebuild
        self.__dict__.update(state)
        self.__dict__.setdefault("_groups", None)
        self.__dict__.setdefault("_lists", [])

    def refresh(self, param_groups: list[dict]) -> None:
        """Rebuild ``params`` / ``names`` if the group layout changed (new list objects then):
        another ``param_groups`` list, or a group whose ``params`` list was replaced or resized.
        (The objects themselves are kept, not their ids, which a new object may reuse.)"""
        if param_groups is self._groups and len(param_groups) == len(self._lists):
            for g, (ps, n) in zip(param_groups, self._lists):
                cur = g["params"]
                if cur is not ps or len(cur) != n:
                    break
            else:
                return
        params, names = [], []
        for gi, g in enumerate(param_groups):
            given = g.get("param_names")
            for pi, p in enumerate(g["params"]):
                params.append(p)
                name = None if self.model_names is None else self.model_names.get(p)
                if name is None:
                    name = str(given[pi]) if given is not None and pi < len(given) else f"param_groups[{gi}][{pi}]"
                names.append(name)
        self.params, self.names = params, names
        self._groups, self._lists = param_groups, [(g["params"], len(g["params"])) for g in param_groups]

    def with_grads(self, param_groups: list[dict]) -> tuple[list[torch.Tensor], list[str]]:
        """The parameters that have a gradient now, and their names (in group order)."""
        self.refresh(param_groups)
        ps = self.params
        for p in ps:
            if p.grad is None:
                keep = [i for i, q in enumerate(ps) if q.grad is not None]
                return [ps[i] for i in keep], [self.names[i] for i in keep]
        return ps, self.names

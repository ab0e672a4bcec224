"""SpikeSkip: skip a step whose global norm is a z-score outlier (OLMo-core's rule), state on the device."""

from __future__ import annotations

import math
from typing import Any

import torch


class SpikeSkip:
    """Skip a step whose global norm is a z-score outlier against a running window (OLMo-core's rule).

    With the previous (up to) ``window`` finite norms ``h``: once at least
    ``max(2, window // 2)`` norms including this one are known, the step is skipped if
    ``n - mean(h) > sigma * std(h)`` (``std`` unbiased, as ``torch.std``). The window is a
    float64 device ring buffer; the decision is a 0-d tensor, never read on the host here.
    Every finite norm enters the window, skipped or not, so a lasting change of level is
    accepted after a while.

    :meth:`check` and :meth:`update` are the float64 torch-op definition; a wrapped step
    computes the same in its fused epilogue (:mod:`fastgrad.optim.epilogue`), which updates
    ``buffer``, ``count`` and ``pos`` in place.
    """

    def __init__(self, sigma: float = 6.0, window: int = 128) -> None:
        s = float(sigma)
        if math.isnan(s) or s <= 0:
            raise ValueError(f"SpikeSkip: sigma must be > 0, got {sigma!r}")
        if isinstance(window, bool) or not isinstance(window, int) or window < 2:
            raise ValueError(f"SpikeSkip: window must be an int >= 2, got {window!r}")
        self.sigma = s
        self.window = window
        self.buffer: torch.Tensor | None = None  # float64 [window]
        self.count: torch.Tensor | None = None  # int64 0-d: valid entries (<= window)
        self.pos: torch.Tensor | None = None  # int64 0-d: next slot to write

    def _ensure(self, device: torch.device) -> None:
        if self.buffer is None:
            self.buffer = torch.zeros(self.window, dtype=torch.float64, device=device)
            self.count = torch.zeros((), dtype=torch.int64, device=device)
            self.pos = torch.zeros((), dtype=torch.int64, device=device)
        elif self.buffer.device != device:
            self.buffer, self.count, self.pos = (t.to(device) for t in (self.buffer, self.count, self.pos))

    def check(self, norm: torch.Tensor) -> torch.Tensor:
        """bool 0-d: is ``norm`` (float64 0-d) a spike against the window?"""
        self._ensure(norm.device)
        valid = torch.arange(self.window, device=norm.device) < self.count
        n = self.count.to(torch.float64)
        mean = torch.where(valid, self.buffer, 0.0).sum() / n.clamp(min=1)
        var = torch.where(valid, (self.buffer - mean) ** 2, 0.0).sum() / (n - 1).clamp(min=1)
        active = (self.count + 1 >= max(2, self.window // 2)) & (self.count >= 2)
        return active & ((norm - mean) > self.sigma * var.sqrt())

    def update(self, norm: torch.Tensor, ok: torch.Tensor) -> None:
        """Append ``norm`` to the window where ``ok`` (bool 0-d)."""
        self._ensure(norm.device)
        slot = torch.arange(self.window, device=norm.device) == self.pos
        self.buffer = torch.where(slot & ok, norm, self.buffer)
        step = ok.to(torch.int64)
        self.count = torch.clamp(self.count + step, max=self.window)
        self.pos = (self.pos + step) % self.window

    def state_dict(self) -> dict[str, Any]:
        self._ensure(torch.device("cpu"))
        return {"sigma": self.sigma, "window": self.window, "buffer": self.buffer.clone(),
                "count": self.count.clone(), "pos": self.pos.clone()}

    def check_state_dict(self, sd: dict[str, Any]) -> None:
        """Raise ``ValueError`` (changing nothing) unless ``sd`` is a state of this detector."""
        if sd.get("window") != self.window or sd.get("sigma") != self.sigma:
            raise ValueError(
                f"SpikeSkip: saved window/sigma {sd.get('window')}/{sd.get('sigma')} differ from "
                f"{self.window}/{self.sigma}"
            )
        for k, shape in (("buffer", (self.window,)), ("count", ()), ("pos", ())):
            v = sd.get(k)
            if not isinstance(v, torch.Tensor) or tuple(v.shape) != shape:
                raise ValueError(f"SpikeSkip: state_dict[{k!r}] must be a tensor of shape {shape}, got {v!r}")

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.check_state_dict(sd)
        # own copies in the dtypes the fused epilogue writes through pointers
        self.buffer = sd["buffer"].detach().to(torch.float64).clone().contiguous()
        self.count = sd["count"].detach().to(torch.int64).clone()
        self.pos = sd["pos"].detach().to(torch.int64).clone()

    def __repr__(self) -> str:
        return f"SpikeSkip(sigma={self.sigma}, window={self.window})"

"""Weights & Biases logger (needs ``wandb``; works offline with ``WANDB_MODE=offline``).

Per flushed step it calls ``run.log`` once with ``grad/step`` (the monitor's
step, declared with ``define_metric`` as the x-axis of ``grad*`` keys so it
does not fight your own ``step``), ``grad/global_norm``,
``grad/global_max_abs``, ``grad/nonfinite``, ``grad/zero_fraction``,
``grad/clip_coef``, ``grad/skipped``, ``grad_norm/<layer>`` and, on
histogram steps, ``grad_hist/global`` (and ``grad_hist/<layer>`` with
``layer_histograms=True``) as ``wandb.Histogram(np_histogram=(counts,
log2_edges))`` built from the fused pass's counts — the same fixed
power-of-two bins at every step, unlike ``wandb.watch``, whose bins follow
each step's min/max. Training health, when measured, under the same x-axis:
``health/total_weight_norm``, ``health/total_update_norm``, ``health/total_update_ratio``,
``health/noise_scale`` and per layer ``weight_norm/<layer>``, ``update_norm/<layer>``,
``update_ratio/<layer>`` (:func:`fastgrad.loggers.base.health_scalars`). Findings are appended to ``run.summary["fastgrad/findings"]``.
"""

from __future__ import annotations

from collections.abc import Sequence

from .base import Logger, RunInfo, StepRecord, health_scalars, trimmed_histogram


class WandbLogger(Logger):
    """Log to ``run`` (an active ``wandb`` run, left open), or to a new ``wandb.init(**init_kwargs)`` run (finished on close)."""

    def __init__(self, run=None, *, layer_scalars: bool = True, layer_histograms: bool = False, **init_kwargs):
        try:
            import wandb
        except ImportError as e:
            raise ImportError("WandbLogger needs the 'wandb' package: pip install wandb") from e
        self._wandb = wandb
        self._own = run is None
        self._init_kwargs = init_kwargs
        self.run = run
        self.layer_scalars, self.layer_histograms = layer_scalars, layer_histograms
        self._findings: list[str] = []

    def open(self, info: RunInfo) -> None:
        super().open(info)
        if self.run is None:
            kw = {"project": "fastgrad", "config": {"fastgrad": info.to_dict()}, **self._init_kwargs}
            self.run = self._wandb.init(**kw)
        self.run.define_metric("grad/step")
        self.run.define_metric("grad*", step_metric="grad/step")
        for pattern in ("health/*", "weight_norm/*", "update_norm/*", "update_ratio/*"):
            self.run.define_metric(pattern, step_metric="grad/step")

    def log_steps(self, records: Sequence[StepRecord]) -> None:
        wb = self._wandb
        for r in records:
            d: dict = {
                "grad/step": r.step,
                "grad/global_norm": r.total_norm,
                "grad/global_max_abs": r.total_max_abs,
                "grad/nonfinite": r.total_nonfinite,
                "grad/zero_fraction": r.total_zero / max(r.total_numel, 1),
            }
            if r.clip_coef is not None:
                d["grad/clip_coef"] = r.clip_coef
            if r.skipped is not None:
                d["grad/skipped"] = int(r.skipped)
            if self.layer_scalars:
                for i, name in enumerate(r.layers):
                    d[f"grad_norm/{name}"] = float(r.norm[i])
            d.update(health_scalars(r, self.layer_scalars))
            if r.histograms is not None:
                hists = [("global", r.global_histogram)]
                if self.layer_histograms:
                    hists += [(n, r.histograms[i]) for i, n in enumerate(r.layers)]
                for name, counts in hists:
                    cut = trimmed_histogram(counts, self.info)
                    if cut is not None:
                        d[f"grad_hist/{name}"] = wb.Histogram(np_histogram=(cut[0].tolist(), cut[1].tolist()))
            self.run.log(d)

    def log_findings(self, findings) -> None:
        self._findings += [f"[{f.kind}] step {f.step}: {f.message}" for f in findings]
        self.run.summary["fastgrad/findings"] = list(self._findings)

    def close(self) -> None:
        if self._own and self.run is not None:
            self.run.finish()
            self.run = None

"""``fastgrad report RUN_DIR``: a run's JSONL turned into pictures (PNG) and one self-contained HTML page.

Figures (matplotlib, drawn on ``matplotlib.figure.Figure`` so the caller's
pyplot backend is never touched):

``heatmap.png``
    layer x step heatmap of ``log10`` of each layer's gradient norm; cells
    holding NaN/Inf in red, all-zero gradients in grey, detector findings
    marked where they began.
``global_norm.png``
    the global norm over steps (log scale) with the clip threshold, the norm
    after clipping, clipped steps (orange) and skipped or non-finite steps
    (red) marked.
``histogram.png``
    the power-of-two magnitude histogram of all gradients over time (x: step,
    y: ``log2 |g|``, colour: fraction of elements), from histogram steps.
``update_ratio.png`` (when the run logged updates, JSONL schema 1.1)
    layer x step heatmap of ``log10(||Δw|| / ||w_before||)`` per layer, skipped steps
    (ratio 0) blank, update-ratio spikes (the ``update_spike`` detector) marked.
``noise_scale.png`` (when the run logged a noise scale)
    the gradient noise scale ``B_simple`` over steps (log scale when positive).

``report.html`` embeds the PNGs (base64), the run's settings, a per-layer
health table and the detectors' findings, so it can be mailed or attached
as one file. Needs ``matplotlib`` (``pip install fastgrad[monitor]``).
"""

from __future__ import annotations

import base64
import html
import itertools
import math
import os
from dataclasses import dataclass

import numpy as np

from .loggers.jsonl import Run, read_run

KIND_STYLE = {  # marker, colour for findings on the heatmap
    "vanishing": ("v", "#4cc9f0"),
    "exploding": ("^", "#ff9f1c"),
    "nonfinite": ("X", "#ff1f5b"),
    "dead": ("s", "#bbbbbb"),
    "update_spike": ("D", "#f72585"),
}
MAX_COLUMNS = 1200  # heatmap columns: longer runs are averaged into this many bins


@dataclass
class Matrix:
    """Per-layer, per-step values of a run as dense arrays (NaN where a layer is absent)."""

    layers: list[str]
    steps: np.ndarray
    norm: np.ndarray  # [L, S]
    nonfinite: np.ndarray  # [L, S] bool
    zero: np.ndarray  # [L, S] bool: all elements zero


def run_matrix(run: Run) -> Matrix:
    layers = run.layers
    idx = {n: i for i, n in enumerate(layers)}
    steps = np.array([s.step for s in run.steps], dtype=np.int64)
    L, S = len(layers), len(run.steps)
    norm = np.full((L, S), np.nan)
    nonfinite = np.zeros((L, S), bool)
    zero = np.zeros((L, S), bool)
    for j, s in enumerate(run.steps):
        rows = [idx[n] for n in s.layers]
        norm[rows, j] = s.norm
        nonfinite[rows, j] = s.nonfinite > 0
        zero[rows, j] = (s.zero == s.numel) & (s.numel > 0)
    return Matrix(layers, steps, norm, nonfinite, zero)


def clip_threshold(run: Run) -> float | None:
    """The run's clip threshold: from its header, else inferred from clipped steps (norm x coefficient)."""
    if run.info.max_norm is not None:
        return run.info.max_norm
    vals = [s.total_norm * s.clip_coef for s in run.steps
            if s.clip_coef is not None and s.clip_coef < 1 and math.isfinite(s.total_norm)]
    return float(np.median(vals)) if vals else None


def _style(ax) -> None:
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.tick_params(labelsize=8)


def _step_edges(steps: np.ndarray) -> np.ndarray:
    if steps.size == 1:
        return np.array([steps[0] - 0.5, steps[0] + 0.5])
    mid = (steps[1:] + steps[:-1]) / 2
    return np.concatenate([[steps[0] - (mid[0] - steps[0])], mid, [steps[-1] + (steps[-1] - mid[-1])]])


def _downsample(m: Matrix) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(edges, log10 norm, nonfinite, zero) with at most MAX_COLUMNS columns (bins averaged / any-ed)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        logn = np.log10(np.where(np.isfinite(m.norm) & (m.norm > 0), m.norm, np.nan))
    S = m.steps.size
    if S <= MAX_COLUMNS:
        return _step_edges(m.steps.astype(float)), logn, m.nonfinite, m.zero, m.steps
    bounds = np.linspace(0, S, MAX_COLUMNS + 1).astype(int).tolist()
    cols = [slice(a, b) for a, b in itertools.pairwise(bounds)]
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN bins
        logd = np.stack([np.nanmean(logn[:, c], axis=1) for c in cols], axis=1)
    nf = np.stack([m.nonfinite[:, c].any(axis=1) for c in cols], axis=1)
    zr = np.stack([m.zero[:, c].all(axis=1) for c in cols], axis=1)
    edges = np.concatenate([[m.steps[0] - 0.5], [m.steps[c.stop - 1] + 0.5 for c in cols]]).astype(float)
    centers = np.array([m.steps[c.start] for c in cols])
    return edges, logd, nf, zr, centers


def plot_heatmap(run: Run, path: str) -> str:
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    m = run_matrix(run)
    L = len(m.layers)
    height = min(16.0, max(3.8, 0.24 * L + 1.8))
    fig = Figure(figsize=(11, height))
    # Fixed margins instead of constrained layout (which costs ~0.5 s a figure): the left
    # margin grows with the longest layer name, the bottom one leaves room for the legend.
    longest = max((len(n) for n in m.layers), default=4)
    left = min(0.45, 0.05 + 0.0062 * longest + 0.03)
    ax = fig.add_axes((left, 1.25 / height, 0.86 - left, 1 - 1.75 / height))
    cax = fig.add_axes((0.88, 1.25 / height, 0.015, 1 - 1.75 / height))
    if L == 0 or m.steps.size == 0:
        ax.text(0.5, 0.5, "no monitored steps", ha="center", va="center", transform=ax.transAxes)
        fig.savefig(path, dpi=110)
        return path
    edges, logn, nf, zr, _ = _downsample(m)
    yedges = np.arange(L + 1) - 0.5
    finite = logn[np.isfinite(logn)]
    vmin, vmax = (np.percentile(finite, 1), np.percentile(finite, 99.5)) if finite.size else (-1, 1)
    if vmax - vmin < 1:
        vmin, vmax = vmin - 0.5, vmax + 0.5
    mesh = ax.pcolormesh(edges, yedges, np.ma.masked_invalid(logn), cmap="viridis", vmin=vmin, vmax=vmax,
                         shading="flat", rasterized=True)
    ax.pcolormesh(edges, yedges, np.ma.masked_where(~zr, np.ones_like(logn)), cmap=ListedColormap(["#c8c8c8"]),
                  shading="flat", rasterized=True)
    ax.pcolormesh(edges, yedges, np.ma.masked_where(~nf, np.ones_like(logn)), cmap=ListedColormap(["#ff1f5b"]),
                  shading="flat", rasterized=True)
    cb = fig.colorbar(mesh, cax=cax)
    cb.set_label("log10 gradient norm", fontsize=9)
    cb.ax.tick_params(labelsize=8)
    step_tick = max(1, math.ceil(L / 45))
    ax.set_yticks(np.arange(0, L, step_tick))
    ax.set_yticklabels([m.layers[i] for i in range(0, L, step_tick)], fontsize=7 if L > 25 else 8)
    ax.set_ylim(L - 0.5, -0.5)  # first layer on top, as in the model
    ax.set_xlabel("step", fontsize=9)
    ax.set_ylabel("layer", fontsize=9)
    ax.set_title(f"Gradient norm per layer ({run.info.model}, {len(m.steps)} monitored steps)", fontsize=11,
                 loc="left")
    handles = [Line2D([], [], marker="s", ls="", color="#ff1f5b", label="NaN/Inf"),
               Line2D([], [], marker="s", ls="", color="#c8c8c8", label="all zero")]
    row = {n: i for i, n in enumerate(m.layers)}
    seen = set()
    for f in run.findings:
        marker, color = KIND_STYLE.get(f.kind, ("o", "white"))
        ys = [row[n] for n in f.layers if n in row]
        if not ys:
            continue
        ax.scatter([f.first_step] * len(ys), ys, marker=marker, s=28, c=color, edgecolors="black",
                   linewidths=0.6, zorder=3)
        if f.kind not in seen:
            seen.add(f.kind)
            handles.append(Line2D([], [], marker=marker, ls="", color=color, markeredgecolor="black",
                                  label=f"{f.kind} (where it began)"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(0, -0.55 / (height - 1.75)), ncol=len(handles),
              fontsize=8, frameon=False, borderaxespad=0)
    _style(ax)
    fig.savefig(path, dpi=110)
    return path


def update_ratio_matrix(run: Run) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(layers, steps, ratio ``[L, S]``) over the steps that logged update ratios (NaN elsewhere)."""
    layers = run.layers
    idx = {n: i for i, n in enumerate(layers)}
    steps = [s for s in run.steps if s.update_ratio is not None]
    ratio = np.full((len(layers), len(steps)), np.nan)
    for j, s in enumerate(steps):
        ratio[[idx[n] for n in s.layers], j] = s.update_ratio
    return layers, np.array([s.step for s in steps], dtype=np.int64), ratio


def plot_update_ratio(run: Run, path: str) -> str:
    """Heatmap of ``log10`` update ratios, layer x step (steps averaged into MAX_COLUMNS bins)."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    layers, steps, ratio = update_ratio_matrix(run)
    L = len(layers)
    height = min(16.0, max(3.8, 0.24 * L + 1.8))
    fig = Figure(figsize=(11, height))
    longest = max((len(n) for n in layers), default=4)
    left = min(0.45, 0.05 + 0.0062 * longest + 0.03)
    ax = fig.add_axes((left, 1.25 / height, 0.86 - left, 1 - 1.75 / height))
    cax = fig.add_axes((0.88, 1.25 / height, 0.015, 1 - 1.75 / height))
    if L == 0 or steps.size == 0:
        ax.text(0.5, 0.5, "no update ratios logged", ha="center", va="center", transform=ax.transAxes)
        fig.savefig(path, dpi=110)
        return path
    m = Matrix(layers, steps, ratio, np.zeros(ratio.shape, bool), np.zeros(ratio.shape, bool))
    edges, logr, _, _, _ = _downsample(m)  # ratio 0 (skipped step) and non-finite -> blank
    finite = logr[np.isfinite(logr)]
    vmin, vmax = (np.percentile(finite, 1), np.percentile(finite, 99.5)) if finite.size else (-4, -2)
    if vmax - vmin < 1:
        vmin, vmax = vmin - 0.5, vmax + 0.5
    mesh = ax.pcolormesh(edges, np.arange(L + 1) - 0.5, np.ma.masked_invalid(logr), cmap="magma", vmin=vmin,
                         vmax=vmax, shading="flat", rasterized=True)
    cb = fig.colorbar(mesh, cax=cax)
    cb.set_label("log10 ||Δw|| / ||w||", fontsize=9)
    cb.ax.tick_params(labelsize=8)
    step_tick = max(1, math.ceil(L / 45))
    ax.set_yticks(np.arange(0, L, step_tick))
    ax.set_yticklabels([layers[i] for i in range(0, L, step_tick)], fontsize=7 if L > 25 else 8)
    ax.set_ylim(L - 0.5, -0.5)
    ax.set_xlabel("step", fontsize=9)
    ax.set_ylabel("layer", fontsize=9)
    ax.set_title(f"Update-to-weight ratio per layer ({run.info.model}, {len(steps)} steps with updates)",
                 fontsize=11, loc="left")
    row = {n: i for i, n in enumerate(layers)}
    marker, color = KIND_STYLE["update_spike"]
    spikes = [(f.first_step, row[n]) for f in run.findings if f.kind == "update_spike" for n in f.layers if n in row]
    if spikes:
        xs, ys = zip(*spikes)
        ax.scatter(xs, ys, marker=marker, s=28, c=color, edgecolors="black", linewidths=0.6, zorder=3)
        ax.legend(handles=[Line2D([], [], marker=marker, ls="", color=color, markeredgecolor="black",
                                  label="update-ratio spike")],
                  loc="upper left", bbox_to_anchor=(0, -0.55 / (height - 1.75)), fontsize=8, frameon=False,
                  borderaxespad=0)
    _style(ax)
    fig.savefig(path, dpi=110)
    return path


def plot_noise_scale(run: Run, path: str) -> str:
    """The gradient noise scale ``B_simple`` at each flush that logged it."""
    from matplotlib.figure import Figure

    pts = [(s.step, s.noise_scale) for s in run.steps if s.noise_scale is not None and math.isfinite(s.noise_scale)]
    fig = Figure(figsize=(11, 3.6))
    ax = fig.add_axes((0.07, 0.16, 0.9, 0.72))
    if not pts:
        ax.text(0.5, 0.5, "no finite noise-scale values logged", ha="center", va="center", transform=ax.transAxes)
    else:
        x, y = (np.array(v, dtype=np.float64) for v in zip(*pts))
        ax.plot(x, y, marker="o", ms=3, lw=1.2, color="#3a0ca3")
        if (y > 0).all():
            ax.set_yscale("log")
        ax.set_ylabel("B_simple (examples)", fontsize=9)
    ax.set_xlabel("step", fontsize=9)
    ax.set_title("Gradient noise scale B_simple = tr(Σ)/|G|² (EMA), at each flush", fontsize=11, loc="left")
    _style(ax)
    fig.savefig(path, dpi=110)
    return path


def plot_global_norm(run: Run, path: str) -> str:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2))
    ax = fig.add_axes((0.08, 0.13, 0.9, 0.79))
    steps = np.array([s.step for s in run.steps])
    norms = np.array([s.total_norm for s in run.steps], dtype=float)
    ok = np.isfinite(norms) & (norms > 0)
    ax.plot(steps[ok], norms[ok], color="#3a86ff", lw=1.4, label="global norm (before clipping)")
    coef = np.array([np.nan if s.clip_coef is None else s.clip_coef for s in run.steps])
    if np.isfinite(coef).any():
        after = norms * np.where(np.isfinite(coef), coef, 1.0)
        ok2 = np.isfinite(after) & (after > 0)
        ax.plot(steps[ok2], after[ok2], color="#8338ec", lw=1.0, ls=":", label="after clipping")
    thr = clip_threshold(run)
    if thr is not None:
        ax.axhline(thr, color="#555555", ls="--", lw=1, label=f"clip threshold {thr:g}")
    clipped = np.isfinite(coef) & (coef < 1)
    if clipped.any():
        sel = clipped & ok
        ax.scatter(steps[sel], norms[sel], s=14, color="#ff9f1c", zorder=3,
                   label=f"clipped ({int(clipped.sum())} steps)")
    skipped = np.array([bool(s.skipped) for s in run.steps])
    bad = ~np.isfinite(norms)
    top = np.nanmax(norms[ok]) if ok.any() else 1.0
    if bad.any():
        ax.scatter(steps[bad], np.full(bad.sum(), top * 3), marker="v", s=30, color="#ff1f5b", zorder=4,
                   label=f"non-finite norm ({int(bad.sum())} steps)")
    if skipped.any():
        for k, s in enumerate(steps[skipped]):
            ax.axvline(s, color="#ff1f5b", alpha=0.25, lw=1.2, label=f"skipped ({int(skipped.sum())} steps)"
                       if k == 0 else None)
    ax.set_yscale("log")
    ax.set_xlabel("step", fontsize=9)
    ax.set_ylabel("global gradient norm", fontsize=9)
    ax.set_title("Global gradient norm", fontsize=11, loc="left")
    ax.grid(True, which="major", alpha=0.25)
    ax.legend(fontsize=8, frameon=False, loc="best")
    if not ok.any():
        ax.text(0.5, 0.5, "no finite norm recorded", ha="center", va="center", transform=ax.transAxes)
    _style(ax)
    fig.savefig(path, dpi=110)
    return path


def plot_histogram(run: Run, path: str) -> str:
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.6))
    ax = fig.add_axes((0.08, 0.12, 0.79, 0.8))
    cax = fig.add_axes((0.88, 0.12, 0.015, 0.8))
    hs = [(s.step, s.global_histogram, s) for s in run.steps if s.histograms is not None]
    info = run.info
    if not hs:
        ax.text(0.5, 0.5, f"no histogram steps recorded (histogram_every={info.histogram_every})",
                ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        fig.savefig(path, dpi=110)
        return path
    steps = np.array([h[0] for h in hs], dtype=float)
    counts = np.stack([h[1] for h in hs]).astype(float)  # [S, B]
    total = np.array([h[2].total_numel for h in hs], dtype=float)
    frac = counts / np.maximum(total, 1)[:, None]
    used = np.flatnonzero(counts.sum(axis=0))
    lo, hi = (int(used[0]), int(used[-1]) + 1) if used.size else (0, counts.shape[1])
    lo, hi = max(0, lo - 1), min(counts.shape[1], hi + 1)
    edges = info.log2_edges()[lo:hi + 1]
    data = np.ma.masked_less_equal(frac[:, lo:hi].T, 0)
    positive = frac[frac > 0]
    vmin = max(positive.min(), 1e-7) if positive.size else 1e-7
    mesh = ax.pcolormesh(_step_edges(steps), edges, data, cmap="magma_r",
                         norm=LogNorm(vmin=vmin, vmax=1.0), shading="flat", rasterized=True)
    cb = fig.colorbar(mesh, cax=cax)
    cb.set_label("fraction of gradient elements", fontsize=9)
    cb.ax.tick_params(labelsize=8)
    zero = np.array([h[2].total_zero for h in hs]) / np.maximum(total, 1)
    nonfin = np.array([h[2].total_nonfinite for h in hs]) / np.maximum(total, 1)
    ax.set_xlabel("step", fontsize=9)
    ax.set_ylabel("log2 |gradient|  (bin [e, e+1) holds 2^e <= |g| < 2^(e+1))", fontsize=8)
    note = f"zeros: {zero[-1]:.1%} of elements at the last histogram step"
    if nonfin.any():
        note += f", NaN/Inf: up to {nonfin.max():.1%}"
    ax.set_title(f"Gradient magnitude histogram over time (all layers; {note})", fontsize=11, loc="left")
    if lo == 0:
        ax.axhline(info.hist_min_exp, color="#888888", lw=0.6, ls=":")
        ax.text(0.003, info.hist_min_exp - 0.5, f"underflow: < 2^{info.hist_min_exp}", color="#333333", fontsize=7,
                va="center", ha="left", transform=ax.get_yaxis_transform())
    _style(ax)
    fig.savefig(path, dpi=110)
    return path


def layer_health(run: Run) -> list[dict]:
    """One row per layer: last norm, finite norm range, non-finite and all-zero steps, findings kinds."""
    m = run_matrix(run)
    kinds: dict[str, set] = {}
    for f in run.findings:
        for n in f.layers:
            kinds.setdefault(n, set()).add(f.kind)
    rows = []
    for i, name in enumerate(m.layers):
        v = m.norm[i]
        fin = v[np.isfinite(v)]
        present = ~np.isnan(v) | m.nonfinite[i]
        last = v[present][-1] if present.any() else math.nan
        rows.append({"layer": name, "last_norm": float(last),
                     "min_norm": float(fin.min()) if fin.size else math.nan,
                     "max_norm": float(fin.max()) if fin.size else math.nan,
                     "nonfinite_steps": int(m.nonfinite[i].sum()), "zero_steps": int(m.zero[i].sum()),
                     "findings": sorted(kinds.get(name, ()))})
    return rows


def _img(path: str) -> str:
    with open(path, "rb") as fh:
        b64 = base64.b64encode(fh.read()).decode("ascii")
    return f'<img alt="{html.escape(os.path.basename(path))}" src="data:image/png;base64,{b64}">'


_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1200px;color:#222}
h1{font-size:1.5em;margin-bottom:.2em} h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
.meta{color:#666;font-size:.9em} img{max-width:100%;border:1px solid #eee}
table{border-collapse:collapse;font-size:.85em} td,th{padding:.25em .7em;border-bottom:1px solid #eee;text-align:right}
td.l,th.l{text-align:left} .vanishing{color:#0077b6} .exploding{color:#e76f00} .nonfinite{color:#d00040}
.dead{color:#777} .update_spike{color:#f72585} .ok{color:#2a9d8f}
"""


def _fmt(x: float) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2e}"


def write_html(run: Run, images: dict[str, str], path: str, title: str) -> str:
    info = run.info
    nsteps = len(run.steps)
    last = run.steps[-1].step if run.steps else 0
    clipped = sum(1 for s in run.steps if s.clip_coef is not None and s.clip_coef < 1)
    skipped = sum(1 for s in run.steps if s.skipped)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>",
             (f"<p class='meta'>model {html.escape(info.model)} · {nsteps} monitored steps (last step {last}) · "
             f"{len(run.layers)} layers · every={info.every} · histogram_every={info.histogram_every} · "
             f"norm_type={info.norm_type:g} · clip threshold {clip_threshold(run) or 'none'} · "
             f"{clipped} clipped · {skipped} skipped · fastgrad {html.escape(info.fastgrad_version)}</p>")]
    parts.append("<h2>Findings</h2>")
    if run.findings:
        parts.append("<table><tr><th>step</th><th>since</th><th class='l'>kind</th><th class='l'>finding</th></tr>")
        for f in run.findings:
            parts.append(f"<tr><td>{f.step}</td><td>{f.first_step}</td><td class='l {f.kind}'>{f.kind}</td>"
                         f"<td class='l'>{html.escape(f.message)}</td></tr>")
        parts.append("</table>")
    else:
        parts.append("<p class='ok'>No vanishing, exploding, non-finite or dead layers (or update-ratio "
                     "spikes) detected.</p>")
    for key, heading in (("heatmap", "Gradient norm per layer over time"), ("global_norm", "Global norm"),
                         ("histogram", "Magnitude histogram over time"),
                         ("update_ratio", "Update-to-weight ratio per layer over time"),
                         ("noise_scale", "Gradient noise scale")):
        if key in images:
            parts.append(f"<h2>{heading}</h2>{_img(images[key])}")
    parts.append("<h2>Layer health</h2><table><tr><th class='l'>layer</th><th>last norm</th><th>min</th>"
                 "<th>max</th><th>NaN/Inf steps</th><th>all-zero steps</th><th class='l'>findings</th></tr>")
    for r in layer_health(run):
        fk = " ".join(f"<span class='{k}'>{k}</span>" for k in r["findings"]) or "<span class='ok'>ok</span>"
        parts.append(f"<tr><td class='l'>{html.escape(r['layer'])}</td><td>{_fmt(r['last_norm'])}</td>"
                     f"<td>{_fmt(r['min_norm'])}</td><td>{_fmt(r['max_norm'])}</td><td>{r['nonfinite_steps']}</td>"
                     f"<td>{r['zero_steps']}</td><td class='l'>{fk}</td></tr>")
    parts.append("</table></body></html>")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(parts))
    return path


def make_report(run_dir: str | os.PathLike, *, out_dir: str | os.PathLike | None = None,
                title: str | None = None) -> dict[str, str]:
    """Write ``heatmap.png``, ``global_norm.png``, ``histogram.png`` and ``report.html``.

    Args:
        run_dir: a directory holding ``gradients.jsonl`` (or the ``.jsonl`` path).
        out_dir: where to write (default ``RUN_DIR/report``).
        title: the page title (default: the run directory's name).

    Also ``update_ratio.png`` and ``noise_scale.png`` when the run logged update ratios or a
    noise scale (JSONL schema 1.1; older files have neither and get the three figures).

    Returns:
        ``{"heatmap": path, "global_norm": path, "histogram": path, "html": path}``, plus
        ``"update_ratio"`` / ``"noise_scale"`` when drawn.
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise ImportError("fastgrad report needs matplotlib: pip install 'fastgrad[monitor]'") from e
    run = read_run(run_dir)
    base = os.fspath(run_dir)
    base_dir = base if os.path.isdir(base) else os.path.dirname(base) or "."
    out = os.fspath(out_dir) if out_dir is not None else os.path.join(base_dir, "report")
    os.makedirs(out, exist_ok=True)
    images = {
        "heatmap": plot_heatmap(run, os.path.join(out, "heatmap.png")),
        "global_norm": plot_global_norm(run, os.path.join(out, "global_norm.png")),
        "histogram": plot_histogram(run, os.path.join(out, "histogram.png")),
    }
    if any(s.update_ratio is not None for s in run.steps):
        images["update_ratio"] = plot_update_ratio(run, os.path.join(out, "update_ratio.png"))
    if any(s.noise_scale is not None for s in run.steps):
        images["noise_scale"] = plot_noise_scale(run, os.path.join(out, "noise_scale.png"))
    name = title or f"fastgrad report: {os.path.basename(os.path.abspath(base_dir))}"
    images["html"] = write_html(run, images, os.path.join(out, "report.html"), name)
    return images

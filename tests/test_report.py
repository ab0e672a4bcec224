"""``fastgrad report``: PNGs and one self-contained HTML page from a run's JSONL."""

from __future__ import annotations

import base64
import re

import pytest
import torch

from fastgrad.monitor import GradMonitor

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A 12-layer sigmoid MLP (vanishing), clipped at 0.05, with a NaN planted at step 20."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("run")
    layers = []
    for _ in range(12):
        layers += [torch.nn.Linear(16, 16), torch.nn.Sigmoid()]
    model = torch.nn.Sequential(*layers, torch.nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(32, 16), torch.randn(32, 1)
    with GradMonitor(model, run_dir=d, histogram_every=3, log_every=8, max_norm=0.05) as m:
        for i in range(30):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            if i == 20:
                model[22].weight.grad[0, 0] = float("nan")
            req = m.stats_request()
            import fastgrad
            stats = fastgrad.grad_stats(model, **req)
            coef = (0.05 / (stats.total_norm + 1e-6)).clamp(max=1.0)
            m.record(stats, clip_coef=coef, skipped=~stats.total_norm.isfinite())
            if i != 20:
                opt.step()
    torch.set_num_threads(threads)
    return d


def test_report_writes_pngs_and_self_contained_html(run_dir):
    from fastgrad.report import make_report

    paths = make_report(run_dir)
    for key in ("heatmap", "global_norm", "histogram"):
        with open(paths[key], "rb") as fh:
            data = fh.read()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, key
    with open(paths["html"], encoding="utf-8") as fh:
        html = fh.read()
    imgs = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(imgs) == 3
    with open(paths["heatmap"], "rb") as fh:
        assert base64.b64decode(imgs[0]) == fh.read()
    assert "vanishing" in html and "non-finite gradients first at step 20" in html
    assert "1 skipped" in html and "clip threshold 0.05" in html
    assert "<img" in html and "http" not in html.split("<body>")[1]  # nothing fetched from elsewhere


def test_report_helpers(run_dir):
    from fastgrad.loggers import read_run
    from fastgrad.report import clip_threshold, layer_health, run_matrix

    run = read_run(run_dir)
    m = run_matrix(run)
    assert m.norm.shape == (13, 30) and m.nonfinite[11, 20] and not m.nonfinite[11, 19]
    assert clip_threshold(run) == 0.05
    rows = {r["layer"]: r for r in layer_health(run)}
    assert rows["22"]["nonfinite_steps"] == 1 and "nonfinite" in rows["22"]["findings"]
    assert "vanishing" in rows["0"]["findings"] and "vanishing" not in rows["24"]["findings"]


def test_report_cli(run_dir, tmp_path, capsys):
    from fastgrad.cli import main

    assert main(["report", str(run_dir), "--out", str(tmp_path / "r")]) == 0
    assert (tmp_path / "r" / "report.html").exists()
    assert "report.html" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "no fastgrad run" in capsys.readouterr().err

"""Loggers: JSONL schema round trip, CSV, TensorBoard read back with EventAccumulator, W&B offline run files."""

from __future__ import annotations

import csv
import glob
import json
import math
import os
import struct
import time

import numpy as np
import pytest
import torch

from fastgrad.loggers import CsvLogger, JsonlLogger, read_run
from fastgrad.loggers.base import RunInfo, trimmed_histogram
from fastgrad.monitor import GradMonitor


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


def run_monitor(loggers, steps=6, nan_at=4, grads_out=None, **kw):
    """A small MLP; a NaN is planted in one layer's gradient at ``nan_at``.

    ``grads_out``: a list that receives, per step, every gradient value as the monitor saw it.
    """
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16), torch.nn.ReLU(),
                                torch.nn.Linear(16, 1))
    opts = {"loggers": loggers, "histogram_every": 2, "log_every": 4}
    opts.update(kw)
    m = GradMonitor(model, **opts)
    x = torch.randn(32, 6)
    for i in range(steps):
        model.zero_grad()
        model(x).pow(2).mean().backward()
        if i == nan_at:
            model[2].weight.grad[0, 0] = float("nan")
            model[2].bias.grad[1] = float("inf")
        if grads_out is not None:
            grads_out.append([v for p in model.parameters() for v in p.grad.double().flatten().tolist()])
        m.step()
    m.close()
    return m


def expected_buckets(values, info):
    """``{log2 upper edge: count}`` of the non-empty global histogram buckets, from the raw gradient
    values alone (math.frexp; not the loggers' helpers): bucket ``[e, e+1)`` holds the finite non-zero
    ``x`` with ``floor(log2 |x|) = e``; values below ``2^min_exp`` share the bucket
    ``[min_exp - 1, min_exp)``, values at or above ``2^max_exp`` the bucket ``[max_exp, max_exp + 1)``."""
    out: dict[int, int] = {}
    for v in values:
        if math.isfinite(v) and v != 0:
            e = math.frexp(abs(v))[1] - 1
            e = min(max(e, info.hist_min_exp - 1), info.hist_max_exp)
            out[e + 1] = out.get(e + 1, 0) + 1
    return out


def assert_same_record(a, b):
    assert a.step == b.step and a.layers == b.layers
    for f in ("numel", "nan", "posinf", "neginf", "zero"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f)
    for f in ("norm", "max_abs"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f)  # NaN == NaN here
    assert a.total_norm == b.total_norm or (math.isnan(a.total_norm) and math.isnan(b.total_norm))
    assert (a.histograms is None) == (b.histograms is None)
    if a.histograms is not None:
        np.testing.assert_array_equal(a.histograms, b.histograms)


def test_jsonl_schema_round_trip(tmp_path):
    m = run_monitor([JsonlLogger(tmp_path)])
    path = tmp_path / "gradients.jsonl"
    lines = [json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
             for line in path.read_text().splitlines()]
    assert lines[0]["type"] == "meta" and lines[0]["schema"] == 1
    assert {"norm_type", "hist_min_exp", "hist_max_exp", "every", "histogram_every", "log_every", "max_norm",
            "model", "detectors", "fastgrad_version", "created"} <= set(lines[0])
    steps = [x for x in lines if x["type"] == "step"]
    assert len(steps) == 6
    s4 = steps[4]
    assert set(s4) >= {"step", "time", "total", "clip_coef", "skipped", "layers", "histograms"}
    assert s4["total"]["norm"] == "nan" and s4["total"]["nonfinite"] == 2
    assert s4["layers"]["2"] == {**s4["layers"]["2"], "nan": 1, "posinf": 1, "norm": "nan"}
    assert "histograms" not in steps[1]
    assert len(steps[0]["histograms"]["0"]) == 16 + 64 + 2
    assert [x["kind"] for x in lines if x["type"] == "finding"] == ["nonfinite"]

    run = read_run(tmp_path)
    assert run.info.histogram_every == 2 and run.layers == ["0", "2", "4"]
    assert len(run.steps) == len(m.records)
    for a, b in zip(run.steps, m.records):
        assert_same_record(a, b)
    assert run.findings == m.findings
    # A new logger on the same directory starts a new file; append=True continues it.
    run_monitor([JsonlLogger(tmp_path, append=True)], steps=2, nan_at=-1)
    assert len(read_run(tmp_path).steps) == 8
    run_monitor([JsonlLogger(tmp_path)], steps=2, nan_at=-1)
    assert len(read_run(tmp_path).steps) == 2


def test_read_run_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_run(tmp_path)
    (tmp_path / "gradients.jsonl").write_text('{"type": "step"}\n')
    with pytest.raises(ValueError, match="before the 'meta'"):
        read_run(tmp_path)


def test_csv_long_format(tmp_path):
    m = run_monitor([CsvLogger(tmp_path)])
    with open(tmp_path / "gradients.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 6 * (3 + 1)
    by = {(int(r["step"]), r["layer"]): r for r in rows}
    for rec in m.records:
        g = by[(rec.step, "<global>")]
        assert int(g["numel"]) == rec.total_numel
        for i, name in enumerate(rec.layers):
            r = by[(rec.step, name)]
            v = float(r["norm"])
            assert (math.isnan(v) and math.isnan(rec.norm[i])) or v == rec.norm[i]
            assert int(r["nan"]) == rec.nan[i] and int(r["zero"]) == rec.zero[i]
    with open(tmp_path / "findings.csv", newline="") as fh:
        f = list(csv.DictReader(fh))
    assert [x["kind"] for x in f] == ["nonfinite"] and f[0]["layers"] == "2" and f[0]["step"] == "4"


def read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_csv_health_columns_match_the_records(tmp_path):
    """Schema 1.1 columns: weight norm, grad/weight ratio, update norm and ratio per layer and on
    the <global> row; the noise scale on the <global> row of each flush's last step; empty where
    not measured (the odd steps are not monitored, so never a value there)."""
    import fastgrad

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()
    ns = fastgrad.NoiseScale(beta=0.5)
    mon = GradMonitor(model, loggers=[CsvLogger(tmp_path)], weights=True, noise_scale=ns, log_every=2,
                      histogram_every=0)
    opt = fastgrad.wrap(torch.optim.AdamW(model.parameters(), lr=0.02), monitor=mon, track_updates=True)
    x = torch.randn(7, 6, dtype=torch.float64)
    weights = []  # per step: {layer: ||w_before||} from the weights themselves
    for i in range(4):
        model.zero_grad(set_to_none=True)
        model(x).pow(2).sum().backward()
        ns.update(torch.tensor(3.0 + i, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64), 1, 4)
        weights.append({k: float(torch.cat([p.detach().reshape(-1) for n, p in model.named_parameters()
                                            if n.startswith(k + ".")]).norm()) for k in ("0", "2")})
        opt.step()
    mon.close()
    rows = read_csv(tmp_path / "gradients.csv")
    assert list(rows[0]) == ["step", "layer", "numel", "norm", "max_abs", "nan", "posinf", "neginf", "zero",
                             "clip_coef", "skipped", "param_norm", "grad_param_ratio", "update_norm",
                             "update_ratio", "noise_scale"]
    by = {(int(r["step"]), r["layer"]): r for r in rows}
    assert len(rows) == 4 * 3 and len(mon.records) == 4
    for rec in mon.records:
        g = by[(rec.step, "<global>")]
        assert float(g["param_norm"]) == rec.total_param_norm
        assert float(g["grad_param_ratio"]) == pytest.approx(rec.total_norm / rec.total_param_norm, rel=1e-15)
        assert float(g["update_norm"]) == rec.total_update_norm > 0
        assert float(g["update_ratio"]) == rec.total_update_ratio > 0
        # the noise scale: read at the flush, on the flush's last record only (steps 1 and 3)
        assert (g["noise_scale"] != "") == (rec.step % 2 == 1)
        if rec.noise_scale is not None:
            assert float(g["noise_scale"]) == rec.noise_scale
        for i, name in enumerate(rec.layers):
            r = by[(rec.step, name)]
            assert float(r["param_norm"]) == rec.param_norm[i]
            assert float(r["param_norm"]) == pytest.approx(weights[rec.step][name], rel=1e-12)
            assert float(r["grad_param_ratio"]) == pytest.approx(float(r["norm"]) / weights[rec.step][name],
                                                                 rel=1e-12)
            assert float(r["update_norm"]) == rec.update_norm[i] > 0
            assert float(r["update_ratio"]) == rec.update_ratio[i]
            assert float(r["update_ratio"]) == pytest.approx(float(r["update_norm"]) / float(r["param_norm"]),
                                                             rel=1e-12)
            assert r["noise_scale"] == ""


def test_csv_health_columns_empty_when_not_measured(tmp_path):
    m = run_monitor([CsvLogger(tmp_path)], steps=2, nan_at=-1)
    rows = read_csv(tmp_path / "gradients.csv")
    assert len(rows) == 2 * 4 and len(m.records) == 2
    for r in rows:
        assert [r[c] for c in ("param_norm", "grad_param_ratio", "update_norm", "update_ratio", "noise_scale")] \
            == [""] * 5


def test_csv_grad_param_ratio_zero_weights_and_other_norms(tmp_path):
    """A zero weight norm gives inf (IEEE, as GradStats.grad_param_ratio); with norm_type != 2
    the norm column is not an L2 norm, so no ratio is written (the weight norm still is)."""
    from fastgrad.loggers.csv import _ratio

    assert _ratio(1.0, 0.0) == math.inf and math.isnan(_ratio(0.0, 0.0)) and _ratio(3.0, 2.0) == 1.5
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    torch.nn.init.zeros_(model[1].weight)
    torch.nn.init.zeros_(model[1].bias)
    for sub, norm_type in (("l2", 2.0), ("inf", math.inf)):
        mon = GradMonitor(model, loggers=[CsvLogger(tmp_path / sub)], weights=True, norm_type=norm_type,
                          histogram_every=0)
        model.zero_grad()
        model(torch.randn(5, 4)).sum().backward()
        mon.step()
        mon.close()
        rows = {r["layer"]: r for r in read_csv(tmp_path / sub / "gradients.csv")}
        assert float(rows["1"]["param_norm"]) == 0.0 and float(rows["0"]["param_norm"]) > 0
        if norm_type == 2.0:
            assert rows["1"]["grad_param_ratio"] == "inf"
            assert float(rows["0"]["grad_param_ratio"]) == pytest.approx(
                float(rows["0"]["norm"]) / float(rows["0"]["param_norm"]), rel=1e-15)
        else:
            assert rows["1"]["grad_param_ratio"] == "" and rows["0"]["grad_param_ratio"] == ""


def test_csv_append_to_a_file_without_health_columns_keeps_its_header(tmp_path):
    from fastgrad.loggers.csv import BASE_COLUMNS

    old = tmp_path / "gradients.csv"
    old.write_text(",".join(BASE_COLUMNS) + "\n0,<global>,1,1.0,1.0,0,0,0,0,,\n")
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    mon = GradMonitor(model, loggers=[CsvLogger(tmp_path, append=True)], weights=True, histogram_every=0)
    model(torch.randn(5, 4)).sum().backward()
    with pytest.warns(RuntimeWarning, match="without the training-health columns"):
        mon.step()
        mon.close()
    with open(old, newline="") as fh:
        lines = list(csv.reader(fh))
    assert lines[0] == BASE_COLUMNS and len(lines) == 1 + 1 + 2
    assert all(len(x) == len(BASE_COLUMNS) for x in lines)
    # a fresh file (no append) gets the full header
    mon = GradMonitor(model, loggers=[CsvLogger(tmp_path)], histogram_every=0)
    mon.step()
    mon.close()
    assert len(read_csv(old)[0]) == len(BASE_COLUMNS) + 5


def test_tensorboard_events_read_back(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import (
        HISTOGRAMS,
        SCALARS,
        TENSORS,
        EventAccumulator,
    )

    from fastgrad.loggers.tensorboard import TensorBoardLogger

    grads = []
    m = run_monitor([TensorBoardLogger(tmp_path)], grads_out=grads)
    acc = EventAccumulator(str(tmp_path), size_guidance={SCALARS: 0, HISTOGRAMS: 0, TENSORS: 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"grad/global_norm", "grad_norm/0", "grad_norm/4"} <= set(tags["scalars"])
    ev = acc.Scalars("grad/global_norm")
    assert [e.step for e in ev] == [r.step for r in m.records]
    for e, r in zip(ev, m.records):
        assert (math.isnan(e.value) and math.isnan(r.total_norm)) or e.value == pytest.approx(r.total_norm, rel=1e-6)
    per_layer = acc.Scalars("grad_norm/2")
    assert per_layer[1].value == pytest.approx(m.records[1].norm[1], rel=1e-6)

    hist = acc.Histograms("grad_log2_magnitude/global")
    hist_records = [r for r in m.records if r.histograms is not None]
    assert [h.step for h in hist] == [r.step for r in hist_records] == [0, 2, 4]
    for h, r in zip(hist, hist_records):
        hv = h.histogram_value
        want = expected_buckets(grads[r.step], m.info)
        limits = list(hv.bucket_limit)
        # contiguous binades from the lowest non-empty one to the highest, nothing outside
        assert limits == [float(e) for e in range(min(want), max(want) + 1)]
        assert hv.min == min(want) - 1 and hv.max == max(want)
        assert {int(lim): c for lim, c in zip(limits, hv.bucket) if c} == {e: float(c) for e, c in want.items()}
        assert hv.num == sum(want.values()) == r.global_histogram.sum()
        # the buckets hold every finite non-zero element
        assert h.histogram_value.num == r.total_numel - r.total_zero - r.total_nonfinite
    layer_hist = acc.Histograms("grad_log2_magnitude/0")
    assert sum(layer_hist[0].histogram_value.bucket) == hist_records[0].histograms[0].sum()


def _wandb_records(path):
    """The protobuf records of a ``run-*.wandb`` file (LevelDB-log framing: 32 KiB blocks, 7-byte headers)."""
    from wandb.proto import wandb_internal_pb2 as pb

    with open(path, "rb") as fh:
        b = fh.read()
    assert b[:4] == b":W&B"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(b):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", b[pos:pos + 7])
        pos += 7
        if kind == 0 and length == 0:
            break
        data, pos = b[pos:pos + length], pos + length
        if kind in (1, 2):
            buf = data
        else:
            buf += data
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            yield rec


def test_wandb_offline_run_files(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from fastgrad.loggers.wandb import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    grads = []
    m = run_monitor([WandbLogger(dir=str(tmp_path), mode="offline", project="fastgrad-test")], grads_out=grads)
    files = glob.glob(os.path.join(tmp_path, "wandb", "offline-run-*", "run-*.wandb"))
    assert len(files) == 1
    # wandb-core (a separate process) may still be writing when finish() returns: wait for the exit record.
    deadline = time.monotonic() + 30
    while True:
        records = list(_wandb_records(files[0]))
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    history = []
    for rec in records:
        if rec.WhichOneof("record_type") == "history":
            history.append({it.key or "/".join(it.nested_key): json.loads(it.value_json) for it in rec.history.item})
    history = [h for h in history if "grad/step" in h]
    assert [h["grad/step"] for h in history] == [r.step for r in m.records]
    for h, r in zip(history, m.records):
        if math.isfinite(r.total_norm):
            assert h["grad/global_norm"] == pytest.approx(r.total_norm, rel=1e-12)
            assert h["grad_norm/0"] == pytest.approx(r.norm[0], rel=1e-12)
        if r.histograms is not None:
            want = expected_buckets(grads[r.step], m.info)
            lo, hi = min(want) - 1, max(want)  # log2 edges of the non-empty range
            assert h["grad_hist/global/_type"] == "histogram"
            assert h["grad_hist/global/bins"] == [float(e) for e in range(lo, hi + 1)]
            assert h["grad_hist/global/values"] == [want.get(e + 1, 0) for e in range(lo, hi)]
        else:
            assert "grad_hist/global/values" not in h


def test_trimmed_histogram_edges():
    info = RunInfo(hist_min_exp=-4, hist_max_exp=2)
    counts = np.zeros(info.num_bins, np.int64)
    counts[[0, 3, info.num_bins - 1]] = [5, 7, 1]
    c, e = trimmed_histogram(counts, info)
    assert c.tolist() == counts.tolist() and e[0] == -5 and e[-1] == 3 and len(e) == len(c) + 1
    counts[:] = 0
    assert trimmed_histogram(counts, info) is None

"""The ``fastgrad`` command line: ``demo`` end to end (``--quick``), ``backends``."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fastgrad.cli import main


def test_demo_quick_end_to_end(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quick", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "1. Deep sigmoid MLP" in text and "2. Badly initialised deep ReLU MLP" in text
    assert "[vanishing]" in text and "[exploding]" in text and "[nonfinite]" in text
    assert "VANISHING" in text and "NONFINITE" in text  # the health tables
    assert "loss" in text and "steps clipped" in text
    for key in ("vanishing-plain", "vanishing-fastgrad", "exploding-plain", "exploding-fastgrad"):
        assert (out / key / "report" / "report.html").exists(), key
        lines = (out / key / "gradients.jsonl").read_text().splitlines()
        steps = [json.loads(x) for x in lines if '"type":"step"' in x]
        assert len(steps) == 30
    clipped = [json.loads(x) for x in (out / "exploding-fastgrad" / "gradients.jsonl").read_text().splitlines()
               if '"type":"step"' in x]
    assert all(s["clip_coef"] is not None for s in clipped) and clipped[0]["clip_coef"] < 1
    # the protected run stays finite where the plain one does not
    plain = (out / "exploding-plain" / "gradients.jsonl").read_text()
    assert '"norm":"nan"' in plain and '"norm":"nan"' not in (out / "exploding-fastgrad" / "gradients.jsonl").read_text()


def test_backends_subcommand(capsys):
    assert main(["backends"]) == 0
    lines = [line.split(None, 2) for line in capsys.readouterr().out.splitlines()]
    # one line per (device, backend): "cpu   cpu        available" (other lines may follow)
    table = {(dev, name): state for dev, name, state in lines
             if state == "available" or state.startswith("unavailable: ")}
    # the CPU backend and the reference are there on every machine the tests run on
    assert table[("cpu", "cpu")] == "available"
    assert table[("cpu", "reference")] == "available" and table[("cuda", "reference")] == "available"
    assert {(dev, name) for dev in ("cpu", "cuda") for name in ("reference", "cpu", "triton", "cuda")} <= set(table)


def test_console_entry_point_help():
    r = subprocess.run([sys.executable, "-m", "fastgrad.cli", "--help"], capture_output=True, text=True, check=False,
                       env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert r.returncode == 0 and "demo" in r.stdout and "report" in r.stdout and "backends" in r.stdout


def test_demo_bad_arguments():
    with pytest.raises(SystemExit):
        main(["demo", "--steps", "0"])

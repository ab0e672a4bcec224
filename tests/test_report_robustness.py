"""``fastgrad report`` / ``read_run`` on damaged runs: a cut last line is skipped, anything else is named."""

from __future__ import annotations

import json

import pytest
import torch

from fastgrad.cli import main
from fastgrad.loggers import read_run
from fastgrad.monitor import GradMonitor


@pytest.fixture
def run_dir(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    x = torch.randn(16, 4)
    with GradMonitor(model, run_dir=tmp_path / "run", histogram_every=2, log_every=3) as m:
        for _ in range(8):
            model.zero_grad()
            model(x).pow(2).mean().backward()
            m.step()
    torch.set_num_threads(threads)
    return tmp_path / "run"


def _lines(run_dir):
    return (run_dir / "gradients.jsonl").read_text().splitlines()


def _write(run_dir, lines, end="\n"):
    (run_dir / "gradients.jsonl").write_text("\n".join(lines) + end)


def test_truncated_last_line_is_skipped_with_a_warning(run_dir, capsys):
    path = run_dir / "gradients.jsonl"
    data = path.read_bytes()
    path.write_bytes(data[:-200])  # `head -c -200`: a crash cut the last line
    kept = data[:-200].decode().split("\n")[:-1]  # the complete lines
    nlines = len(kept) + 1
    with pytest.warns(RuntimeWarning, match=rf"gradients.jsonl:{nlines}: the last line is incomplete"):
        run = read_run(run_dir)
    assert [s.step for s in run.steps] == [json.loads(x)["step"] for x in kept if '"type":"step"' in x]
    assert len(run.steps) >= 6
    pytest.importorskip("matplotlib")
    assert main(["report", str(run_dir)]) == 0
    err = capsys.readouterr().err
    assert f"warning: {path}:{nlines}: the last line is incomplete" in err and "Traceback" not in err
    assert (run_dir / "report" / "report.html").exists()


@pytest.mark.parametrize(("bad", "message"), [
    ("[1, 2]", "a JSON list, expected an object with a 'type'"),
    ("step-without-layers", "a 'step' line without 'layers'"),
    ('{"type": "step", "step": 3, "layers": {"0": {"norm": 1.0}}}', "a 'step' line without"),
    ('{"type": "step", "step": 3, "total": {"norm": 1}, "layers": [1]}', "'layers' is not an object"),
    ('{"type": "finding", "kind": "dead"}', "a 'finding' line without"),
    ('{"type": 7}', "no 'type' string"),
    ('..."total{"type":"step"', "not JSON"),  # two writers spliced their lines together
])
def test_malformed_line_names_file_and_line(run_dir, capsys, bad, message):
    lines = _lines(run_dir)
    if bad == "step-without-layers":
        obj = json.loads(lines[2])
        del obj["layers"]
        bad = json.dumps(obj)
    lines[2] = bad
    _write(run_dir, lines)
    where = f"{run_dir / 'gradients.jsonl'}:3: "
    with pytest.raises(ValueError, match="^" + where.replace("\\", "\\\\") + ".*") as e:
        read_run(run_dir)
    assert message in str(e.value)
    pytest.importorskip("matplotlib")
    assert main(["report", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fastgrad report: {where}") and message in err and "Traceback" not in err


def test_malformed_last_line_of_valid_json_is_an_error_not_skipped(run_dir):
    lines = _lines(run_dir)
    _write(run_dir, [*lines, "[1, 2]"])
    with pytest.raises(ValueError, match=f":{len(lines) + 1}: a JSON list"):
        read_run(run_dir)


def test_malformed_meta_header_is_named(run_dir):
    lines = _lines(run_dir)
    meta = json.loads(lines[0])
    meta["hist_min_exp"] = "low"
    _write(run_dir, [json.dumps(meta), *lines[1:]])
    with pytest.raises(ValueError, match=r":1: malformed 'meta' header \('hist_min_exp' is 'low'"):
        read_run(run_dir)

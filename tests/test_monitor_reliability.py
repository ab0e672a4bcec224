"""GradMonitor loses nothing and corrupts nothing: one writer per file, bad destinations, failing loggers, copies."""

from __future__ import annotations

import ast
import copy
import errno
import gc
import json
import os
import pathlib
import pickle
import signal
import subprocess
import sys
import warnings

import pytest
import torch

import fastgrad
from fastgrad.loggers import CsvLogger, JsonlLogger, Logger, read_run
from fastgrad.monitor import GradMonitor

PKG_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(fastgrad.__file__)))


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


def tiny():
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))


def train(model, opt_or_monitor, steps):
    x = torch.randn(16, 4)
    for _ in range(steps):
        model.zero_grad()
        model(x).pow(2).mean().backward()
        opt_or_monitor.step()


def jsonl_lines(run_dir):
    text = (pathlib.Path(run_dir) / "gradients.jsonl").read_text()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]  # every line whole: nothing interleaved


# -- one writer per file ------------------------------------------------------------------
def test_second_monitor_on_one_run_dir_is_refused_naming_the_first(tmp_path):
    model = tiny()
    first = GradMonitor(model, run_dir=tmp_path, log_every=2)
    train(model, first, 3)
    with pytest.raises(RuntimeError, match=rf"already being written by this process.*{tmp_path}") as e:
        GradMonitor(model, run_dir=tmp_path, log_every=2)
    assert ".gradients.jsonl.lock" in str(e.value) and "close()" in str(e.value)
    with pytest.raises(RuntimeError, match="already being written"):
        GradMonitor(model, run_dir=tmp_path, loggers=("csv", "jsonl"))  # the CSV it opened first is closed again
    assert not (tmp_path / ".gradients.csv.lock").exists()
    train(model, first, 3)  # the refused monitors truncated nothing and wrote nothing
    first.close()
    lines = jsonl_lines(tmp_path)
    assert [x["type"] for x in lines] == ["meta"] + ["step"] * 6
    assert [x["step"] for x in lines[1:]] == list(range(6))
    assert not (tmp_path / ".gradients.jsonl.lock").exists()
    with GradMonitor(model, run_dir=tmp_path) as again:  # released by close()
        train(model, again, 1)
    assert len(read_run(tmp_path).steps) == 1


def test_explicit_loggers_on_one_file_are_refused_too(tmp_path):
    a = JsonlLogger(tmp_path)
    GradMonitor(tiny(), loggers=[a]).close()
    m = GradMonitor(tiny(), loggers=[JsonlLogger(tmp_path / "gradients.jsonl")])
    with pytest.raises(RuntimeError, match="already being written"):
        GradMonitor(tiny(), loggers=[JsonlLogger(tmp_path, append=True)])
    m.close()
    with pytest.raises(RuntimeError, match="already being written"):
        with GradMonitor(tiny(), loggers=[CsvLogger(tmp_path)]):
            GradMonitor(tiny(), loggers=[CsvLogger(tmp_path)])


def test_monitor_dropped_without_close_releases_its_lock(tmp_path):
    model = tiny()
    m = GradMonitor(model, run_dir=tmp_path, log_every=1)
    train(model, m, 2)
    del m
    gc.collect()
    assert not (tmp_path / ".gradients.jsonl.lock").exists()
    GradMonitor(model, run_dir=tmp_path).close()


def test_default_run_dirs_are_never_shared(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = tiny()
    ms = [GradMonitor(model) for _ in range(3)]  # same second, same default name
    dirs = {m.run_dir for m in ms}
    assert len(dirs) == 3 and all(d.startswith("fastgrad_runs") for d in dirs)
    for m in ms:
        train(model, m, 1)
        m.close()
        assert len(read_run(m.run_dir).steps) == 1


_CHILD = """
import os, signal, sys, torch, fastgrad
m = fastgrad.GradMonitor(torch.nn.Linear(2, 2), run_dir=sys.argv[1])
print(os.getpid(), flush=True)
cmd = sys.stdin.readline().strip()
if cmd == "kill":
    os.kill(os.getpid(), signal.SIGKILL)  # dies holding the lock: no close(), no atexit
sys.exit(0)  # a normal exit without close(): the lock goes at interpreter exit
"""


def _child(run_dir):
    p = subprocess.Popen([sys.executable, "-c", _CHILD, str(run_dir)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True, env={**os.environ, "PYTHONPATH": PKG_ROOT})
    pid = int(p.stdout.readline())
    return p, pid


@pytest.mark.skipif(sys.platform == "win32", reason="flock locks (the Windows fallback has no stale-lock takeover)")
def test_monitor_of_another_process_is_refused_and_its_stale_lock_taken_over(tmp_path):
    p, pid = _child(tmp_path)
    try:
        with pytest.raises(RuntimeError, match=rf"process {pid} .*since"):
            GradMonitor(tiny(), run_dir=tmp_path)
        p.stdin.write("kill\n")
        p.stdin.flush()
        assert p.wait(60) == -signal.SIGKILL
    finally:
        p.kill()
    assert (tmp_path / ".gradients.jsonl.lock").exists()  # left behind by the dead process
    with pytest.warns(RuntimeWarning, match=rf"stale lock .*process {pid}"):
        m = GradMonitor(tiny(), run_dir=tmp_path)
    m.close()
    assert not (tmp_path / ".gradients.jsonl.lock").exists()


def test_lock_released_at_interpreter_exit(tmp_path):
    p, pid = _child(tmp_path)
    p.stdin.write("exit\n")
    p.stdin.flush()
    assert p.wait(60) == 0
    assert not (tmp_path / ".gradients.jsonl.lock").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no stale-lock warning: it was released cleanly
        GradMonitor(tiny(), run_dir=tmp_path).close()


# -- unwritable destinations and failing loggers -----------------------------------------------
@pytest.mark.parametrize("loggers", [("jsonl",), ("csv",), ("jsonl", "csv")])
def test_unwritable_run_dir_is_an_error_at_construction(tmp_path, loggers):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    for bad in (blocker / "run", pathlib.Path("/proc/fastgrad_no_such_dir/run")):
        with pytest.raises(OSError, match=rf"cannot write .*{bad.parent.name}.*writable run_dir"):
            GradMonitor(tiny(), run_dir=bad, loggers=loggers)
    with pytest.raises(OSError, match="writable run_dir"):
        JsonlLogger(blocker / "x.jsonl").open(fastgrad.loggers.RunInfo())


class _Full:
    """A file object whose writes fail as on a full disk."""

    def __init__(self, fh):
        self._fh = fh

    def write(self, s):
        raise OSError(errno.ENOSPC, "No space left on device")

    def flush(self):
        raise OSError(errno.ENOSPC, "No space left on device")

    def close(self):
        self._fh.close()


class _Counting(Logger):
    def __init__(self):
        self.steps = []

    def log_steps(self, records):
        self.steps += [r.step for r in records]


def test_logger_failing_mid_run_warns_once_and_training_goes_on(tmp_path):
    model = tiny()
    counting = _Counting()
    m = GradMonitor(model, run_dir=tmp_path, loggers=("jsonl", "csv", counting), log_every=2)
    opt = fastgrad.wrap(torch.optim.SGD(model.parameters(), lr=0.1), max_norm=1.0, monitor=m)
    train(model, opt, 2)
    jsonl = m.loggers[0]
    jsonl._fh = _Full(jsonl._fh)  # the disk fills up
    w0 = model[0].weight.detach().clone()
    with pytest.warns(RuntimeWarning, match="JsonlLogger .*No space left on device.*Training goes on") as rec:
        train(model, opt, 6)  # three more flushes: one warning
    assert sum("No space left" in str(w.message) for w in rec) == 1
    assert not torch.equal(model[0].weight, w0)  # the optimizer kept stepping
    assert [type(lg).__name__ for lg in m.loggers] == ["CsvLogger", "_Counting"]
    with pytest.warns(RuntimeWarning, match="closed with 1 failed logger"):
        m.close()  # does not raise
    assert len(m.logger_failures) == 1 and m.logger_failures[0].step == 2
    assert isinstance(m.logger_failures[0].error, OSError)
    assert counting.steps == list(range(8)) and [r.step for r in m.records] == list(range(8))
    with open(tmp_path / "gradients.csv") as fh:
        assert sum(1 for line in fh if ",<global>," in line) == 8
    assert len(read_run(tmp_path).steps) == 2  # the JSONL ends where the disk filled up
    assert not (tmp_path / ".gradients.jsonl.lock").exists()  # the failed logger let its file go


def test_logger_failing_on_close_does_not_make_close_raise(tmp_path):
    class BadClose(_Counting):
        def close(self):
            raise OSError(errno.EIO, "Input/output error")

    model = tiny()
    m = GradMonitor(model, run_dir=tmp_path, loggers=("jsonl", BadClose()))
    train(model, m, 3)
    with pytest.warns(RuntimeWarning, match="BadClose failed closing: OSError.*Input/output error"):
        m.close()
    assert m.closed and len(read_run(tmp_path).steps) == 3
    assert [f.action for f in m.logger_failures] == ["closing"]


# -- copies ---------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_wrapped_optimizer_with_monitor_can_be_copied(tmp_path, how):
    model = tiny()
    m = GradMonitor(model, run_dir=tmp_path, log_every=2)
    opt = fastgrad.wrap(torch.optim.SGD(model.parameters(), lr=0.1), max_norm=1.0, monitor=m)
    train(model, opt, 3)  # two flushed steps (files open), one buffered
    dup = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    cm = dup._guard.monitor
    assert cm is not m and cm.loggers == [] and cm.run_dir is None and not cm.closed
    assert [r.step for r in cm.records] == [0, 1] and cm.num_steps == 3
    assert cm.info == m.info
    cm.flush()  # the copy flushes its own buffered step into its records, writing no file
    assert [r.step for r in cm.records] == [0, 1, 2]
    cm.close()
    # The original goes on writing its file, which the copy never touched.
    train(model, opt, 3)
    m.close()
    assert [x["step"] for x in jsonl_lines(tmp_path)[1:]] == list(range(6))


def test_open_file_logger_refuses_to_be_copied_with_a_reason(tmp_path):
    lg = JsonlLogger(tmp_path)
    copy.deepcopy(lg)  # not open yet: just a path
    m = GradMonitor(tiny(), loggers=[lg])
    with pytest.raises(TypeError, match="open JsonlLogger .*cannot be copied"):
        copy.deepcopy(lg)
    m.close()


# -- structure --------------------------------------------------------------------------------
def _imports(path):
    tree = ast.parse(pathlib.Path(path).read_text())
    return {(n.module or "") for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}


def test_detectors_and_loggers_do_not_import_each_other():
    pkg = pathlib.Path(fastgrad.__file__).parent
    assert not any("loggers" in mod for mod in _imports(pkg / "detectors.py"))
    for f in (pkg / "loggers").glob("*.py"):
        assert not any("detectors" in mod for mod in _imports(f)), f.name
    assert not any(mod.startswith(".") and mod != "." for mod in _imports(pkg / "records.py"))
    from fastgrad.detectors import Finding
    from fastgrad.loggers.base import RunInfo, StepRecord
    from fastgrad.records import Finding as F2, RunInfo as R2, StepRecord as S2
    assert (Finding, RunInfo, StepRecord) == (F2, R2, S2) and fastgrad.Finding is Finding


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX pids")
def test_without_flock_the_lock_owner_is_judged_by_its_pid(tmp_path, monkeypatch):
    import socket

    import fastgrad.loggers.files as files

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(files.fcntl, "flock", no_flock)
    lock = tmp_path / ".gradients.jsonl.lock"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    host = socket.gethostname()
    lock.write_text(json.dumps({"pid": 1, "host": host, "started": "earlier"}))  # pid 1 always runs
    with pytest.raises(RuntimeError, match="already being written by process 1, since earlier"):
        GradMonitor(tiny(), run_dir=tmp_path)
    lock.write_text(json.dumps({"pid": int(dead.stdout), "host": host, "started": "earlier"}))
    with pytest.warns(RuntimeWarning, match="stale lock"):
        m = GradMonitor(tiny(), run_dir=tmp_path)
    with pytest.raises(RuntimeError, match="already being written by this process"):
        GradMonitor(tiny(), run_dir=tmp_path)
    m.close()
    assert not lock.exists()

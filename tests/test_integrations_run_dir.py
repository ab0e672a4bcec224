"""Trainer callbacks' default run directory: one per rank, so ranks never share a locked file."""

import os

import torch.distributed as dist

from fastgrad.integrations._run_dir import default_run_dir


def test_default_run_dir_is_per_rank(monkeypatch):
    assert default_run_dir("out") == os.path.join("out", "fastgrad")  # not distributed
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    assert default_run_dir("out") == os.path.join("out", "fastgrad")
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 3)
    assert default_run_dir("out") == os.path.join("out", "fastgrad", "rank3")

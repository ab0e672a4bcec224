"""The monitor's global norm is the statistics' total row, not a recombination of the layers it logs.

Under pipeline parallelism a stage logs its own layers while the total row is the whole model's
(fastgrad.distributed); the record must carry that total.
"""

import pytest
import torch

import fastgrad
from fastgrad.spec import RawStats, StatsResult
from fastgrad.stats import build_stats


def test_record_total_norm_is_the_total_row(tmp_path):
    m = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))
    m(torch.randn(4, 3)).sum().backward()
    local = fastgrad.grad_stats(m, histogram=False)
    # as a pipeline stage sees it: its own rows, a whole-model total 10x larger
    whole = RawStats(local.total.raw.floats * 10.0, local.total.raw.counts)
    res = StatsResult(local.raw, torch.cat([local.numel, local.numel.sum().reshape(1)]), whole)
    labels = [n.rpartition(".")[0] for n in local.names]
    stage = build_stats(local.names, local.spec, res, labels)
    mon = fastgrad.GradMonitor(m, run_dir=str(tmp_path), loggers=(), log_every=1)
    mon.stats_request()
    mon.record(stage)
    mon.close()
    rec = mon.records[-1]
    assert rec.total_norm == pytest.approx(10.0 * local.total_norm.item(), rel=1e-15)
    assert rec.norm.tolist() == pytest.approx(local.groups.tensor_norms.tolist(), rel=1e-15)

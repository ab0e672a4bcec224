"""Gradient noise scale (fastgrad.noise_scale) on linear regression with known noise.

The problem: x ~ N(0, I_d), y = x.w* + eps, eps ~ N(0, s^2), per-example loss (x.w - y)^2 / 2 at
fixed weights w = w* + e. The per-example gradient is g = (x.e - eps) x, so
G = E g = e and, with Gaussian moments (E[(x.e)^2 |x|^2] = (d+2)|e|^2),
tr(Sigma) = E|g|^2 - |G|^2 = (d+1)|e|^2 + d s^2:  B_simple = tr(Sigma)/|G|^2 in closed form,
checked against per-example gradients from torch.func (vmap of grad).

Statistical checks: with the weights fixed, the per-step estimates are i.i.d.; the ratio of
their means has a delta-method standard error SE computed from the same samples, and the test
allows 4 SE (a false failure has probability ~6e-5; the seeds are fixed, so runs are
reproducible). The EMA is checked the same way with its own weights.
"""

from __future__ import annotations

import datetime
import math
import os

import pytest
import torch
import torch.distributed as dist
from conftest import spawn_ranks

from fastgrad.noise_scale import NoiseScale, register_ddp_hook, register_fsdp_hook, two_batch_estimates

D, SIGMA, E_NORM = 8, 1.0, 1.0
B_TRUE = ((D + 1) * E_NORM**2 + D * SIGMA**2) / E_NORM**2  # 17
JOIN_TIMEOUT = 150  # seconds for a whole multi-rank run (as tests/test_distributed.py)


def problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w_star = torch.randn(D, generator=g, dtype=torch.float64)
    e = torch.randn(D, generator=g, dtype=torch.float64)
    e = e / e.norm() * E_NORM
    return w_star, w_star + e


def batch(w_star, n: int, gen: torch.Generator):
    x = torch.randn(n, D, generator=gen, dtype=torch.float64)
    y = x @ w_star + SIGMA * torch.randn(n, generator=gen, dtype=torch.float64)
    return x, y


def per_example_grads(w, x, y):
    def loss(w_, xi, yi):
        return 0.5 * (xi @ w_ - yi) ** 2

    return torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(w, x, y)


def ratio_and_se(tr: torch.Tensor, g2: torch.Tensor, weights: torch.Tensor | None = None):
    """``R = sum(w tr)/sum(w g2)`` and its standard error under ``B_simple = B_TRUE``.

    ``R - B = sum(w z) / sum(w g2)`` with ``z_t = tr_t - B g2_t``, i.i.d. with mean 0 exactly when
    the estimators are unbiased and ``B`` is the truth: ``Var(sum w z) = sum w^2 Var(z)`` (CLT),
    with ``Var(z)`` from the samples. (Residuals at ``B``, not at ``R``: no ratio bias, and heavy
    tails of ``g2`` cannot shrink the SE along with a low ``R``.)
    """
    w = torch.ones_like(tr) if weights is None else weights
    r = (w * tr).sum() / (w * g2).sum()
    z = tr - B_TRUE * g2
    se = math.sqrt(float((w**2).sum() * z.var())) / float((w * g2).sum())
    return float(r), se


def test_closed_form_matches_per_example_gradients():
    w_star, w = problem()
    x, y = batch(w_star, 50_000, torch.Generator().manual_seed(1))
    g = per_example_grads(w, x, y)
    mean = g.mean(0)
    tr = ((g - mean) ** 2).sum(1).mean()
    assert torch.allclose(mean, w - w_star, atol=0.08)  # SE of each component ~ sqrt(17/5e4) ~ 0.02
    # tr(Sigma) = (d+1)|e|^2 + d s^2 = 17; the sample trace's SE is ~0.2 here (|g|^2 has sd ~40)
    se = float(((g - mean) ** 2).sum(1).std()) / math.sqrt(len(g))
    assert abs(float(tr) - (D + 1) * E_NORM**2 - D * SIGMA**2) < 4 * se
    b_emp = float(tr / mean.square().sum())
    assert abs(b_emp - B_TRUE) / B_TRUE < 0.1


def test_two_batch_estimates_formula():
    # exact inputs E|G_B|^2 = |G|^2 + tr/B give back |G|^2 and tr
    g2, tr = 2.5, 40.0
    est = two_batch_estimates(g2 + tr / 4, g2 + tr / 32, 4, 32)
    assert est[0] == pytest.approx(g2, rel=1e-12) and est[1] == pytest.approx(tr, rel=1e-12)
    with pytest.raises(ValueError, match="b_small < b_big"):
        two_batch_estimates(1.0, 1.0, 8, 8)


def _accumulation_run(steps: int, k: int, b: int, reduction: str, seed: int = 2):
    w_star, w0 = problem()
    model = torch.nn.Linear(D, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(w0)
    ns = NoiseScale(beta=0.98)
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        xs = []
        for i in range(k):
            x, y = batch(w_star, b, gen)
            xs.append((x, y))
            loss = 0.5 * ((model(x).squeeze(1) - y) ** 2).mean()
            (loss / k if reduction == "mean" else loss).backward()
            if i == 0:
                ns.first_micro_batch(model)
        ns.accumulated(model, micro_batch_size=b, micro_batches=k, reduction=reduction)
        rows.append((xs, float(ns.last_gradient_sq), float(ns.last_trace)))
    return ns, rows, w0


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_accumulation_step_is_exact(reduction):
    """Each step's estimates equal the A.1 formulas on per-example gradients (float64)."""
    k, b = 4, 3
    ns, rows, w0 = _accumulation_run(5, k, b, reduction)
    for xs, g2, tr in rows:
        grads = [per_example_grads(w0, x, y) for x, y in xs]
        small = grads[0].mean(0).square().sum()
        big = torch.cat(grads).mean(0).square().sum()
        want = two_batch_estimates(small, big, b, k * b)
        assert g2 == pytest.approx(float(want[0]), rel=1e-9, abs=1e-12)
        assert tr == pytest.approx(float(want[1]), rel=1e-9)


def test_accumulation_scale_and_total_norm_arguments():
    """A loss scale S divided out by ``scale=S``, and the big norm given as ``total_norm``
    (e.g. the monitor's), give the same estimates as the plain call."""
    import fastgrad

    w_star, w0 = problem()
    results = []
    for loss_scale, use_total in ((1.0, False), (8.0, True)):
        model = torch.nn.Linear(D, 1, bias=False).double()
        with torch.no_grad():
            model.weight.copy_(w0)
        ns, gen = NoiseScale(beta=0.5), torch.Generator().manual_seed(5)
        for _ in range(3):
            model.zero_grad(set_to_none=True)
            for i in range(3):
                x, y = batch(w_star, 2, gen)
                (loss_scale * 0.5 * ((model(x).squeeze(1) - y) ** 2).mean() / 3).backward()
                if i == 0:
                    ns.first_micro_batch(model)
            total = fastgrad.get_total_norm([model.weight.grad]) if use_total else None
            ns.accumulated(None if use_total else model, micro_batch_size=2, micro_batches=3,
                           total_norm=total, scale=loss_scale if use_total else None)
        results.append(ns.to_dict())
    assert results[1] == pytest.approx(results[0], rel=1e-12)
    assert results[0]["steps"] == 3


def test_accumulation_estimates_true_noise_scale():
    steps, k, b = 600, 4, 4
    ns, rows, _ = _accumulation_run(steps, k, b, "mean")
    g2 = torch.tensor([r[1] for r in rows], dtype=torch.float64)
    tr = torch.tensor([r[2] for r in rows], dtype=torch.float64)
    r, se = ratio_and_se(tr, g2)
    assert se < 0.25 * B_TRUE, f"test too weak: SE {se}"
    assert abs(r - B_TRUE) < 4 * se, f"ratio of means {r} vs true {B_TRUE}, SE {se}"
    # the object's EMA: the same check with the EMA's weights (1-beta) beta^(N-1-t)
    beta = ns.beta
    wts = (1 - beta) * beta ** torch.arange(steps - 1, -1, -1, dtype=torch.float64)
    r_ema, se_ema = ratio_and_se(tr, g2, wts)
    assert float(ns.b_simple) == pytest.approx(r_ema, rel=1e-9)
    assert abs(r_ema - B_TRUE) < 4 * se_ema, f"EMA {r_ema} vs {B_TRUE}, SE {se_ema}"
    # bias-corrected EMAs of the two pieces
    assert float(ns.trace) == pytest.approx(float((wts * tr).sum() / wts.sum()), rel=1e-9)
    assert float(ns.gradient_sq) == pytest.approx(float((wts * g2).sum() / wts.sum()), rel=1e-9)


def test_nonfinite_step_leaves_state_and_errors():
    ns = NoiseScale(beta=0.5)
    ns.update(torch.tensor(3.0), torch.tensor(1.0), 1, 2)
    before = ns.to_dict()
    ns.update(torch.tensor(float("nan")), torch.tensor(1.0), 1, 2)
    after = ns.to_dict()
    for key in ("b_simple", "gradient_sq", "trace", "steps"):
        assert after[key] == before[key]
    assert math.isnan(after["last_trace"])
    assert math.isnan(float(NoiseScale().b_simple))
    with pytest.raises(ValueError, match="beta"):
        NoiseScale(beta=1.0)
    with pytest.raises(RuntimeError, match="first_micro_batch"):
        NoiseScale().accumulated(total_norm=torch.tensor(1.0), micro_batch_size=2, micro_batches=2)
    # state_dict round trip keeps every value
    other = NoiseScale()
    other.load_state_dict(ns.state_dict())
    assert other.to_dict() == pytest.approx(after, nan_ok=True)


# -- DDP (gloo, CPU) -------------------------------------------------------------------------------

def _entry(rank: int, world: int, store: str, steps: int, b: int, kinds: list[str]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        for kind in kinds:
            try:
                _run_kind(rank, world, steps, b, kind)
            except Exception as e:
                raise AssertionError(f"rank {rank}/{world}, {kind}: {e}") from e
            dist.barrier()
    finally:
        dist.destroy_process_group()


def _run_kind(rank: int, world: int, steps: int, b: int, kind: str) -> None:
    w_star, w0 = problem()
    lin = torch.nn.Linear(D, 1, bias=False).double()
    with torch.no_grad():
        lin.weight.copy_(w0)
    ns = NoiseScale(beta=0.98)
    if kind == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(lin)
        hook = register_ddp_hook(ns, model, batch_size=b)
        full_grad = lambda: lin.weight.grad.detach()  # noqa: E731
    else:  # FSDP2; float64 gradients: FSDP reduces with SUM and a pre-divide factor
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        model = fully_shard(lin, mesh=init_device_mesh("cpu", (world,)))
        hook = register_fsdp_hook(ns, model, batch_size=b)
        full_grad = lambda: lin.weight.grad.full_tensor()  # noqa: E731
    gen = torch.Generator().manual_seed(1000 + rank)
    g2s, trs = [], []
    for step in range(steps):
        model.zero_grad(set_to_none=True)
        x, y = batch(w_star, b, gen)
        loss = 0.5 * ((model(x).squeeze(1) - y) ** 2).mean()
        loss.backward()
        hook.step()
        g2s.append(float(ns.last_gradient_sq))
        trs.append(float(ns.last_trace))
        if step < 3:  # exactness: the hook's norms equal those of the per-example gradients
            local = per_example_grads(w0, x, y).mean(0)
            small = local.square().sum().reshape(1)
            dist.all_reduce(small)
            small = small[0] / world
            big = full_grad().reshape(-1).square().sum()
            want = two_batch_estimates(small, big, b, world * b)
            # FSDP's pre-divide (float64 gradients: 2 for 2 and 4 ranks) scales both pieces
            pre2 = 4.0 if kind == "fsdp" else 1.0
            assert g2s[-1] * pre2 == pytest.approx(float(want[0]), rel=1e-9, abs=1e-12)
            assert trs[-1] * pre2 == pytest.approx(float(want[1]), rel=1e-9)
    every = [None] * world
    dist.all_gather_object(every, (g2s, trs, float(ns.b_simple)))
    assert all(e == every[0] for e in every), "ranks disagree on the estimates"
    g2 = torch.tensor(g2s, dtype=torch.float64)
    tr = torch.tensor(trs, dtype=torch.float64)
    r, se = ratio_and_se(tr, g2)
    assert se < 0.25 * B_TRUE, f"test too weak: SE {se}"
    assert abs(r - B_TRUE) < 4 * se, f"{world} ranks: ratio of means {r} vs true {B_TRUE}, SE {se}"


def _spawn(world: int, tmp_path, steps: int, b: int, kinds: list[str]) -> None:
    store = os.path.join(str(tmp_path), "store")
    spawn_ranks(_entry, (world, store, steps, b, kinds), world, JOIN_TIMEOUT, f"noise-scale {kinds}")


@pytest.mark.parametrize("world", [2, 4])
def test_ddp_and_fsdp2_estimate_true_noise_scale(world, tmp_path):
    """One spawn per world size (process start-up dominates): DDP, then FSDP2, each checked per
    step against per-example gradients (1e-9) and over the run against B_simple (4 SE)."""
    _spawn(world, tmp_path, steps=600 if world == 2 else 300, b=4, kinds=["ddp", "fsdp"])

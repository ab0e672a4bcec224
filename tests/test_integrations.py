"""Trainer callbacks: Lightning and HuggingFace transformers, on tiny models built from code/configs (no downloads)."""

from __future__ import annotations

import math

import pytest
import torch

from fastgrad.loggers import read_run


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_lightning_callback_monitors_every_optimizer_step(tmp_path):
    L = pytest.importorskip("lightning.pytorch")
    from fastgrad.integrations.lightning import FastgradCallback

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))

        def training_step(self, batch, _):
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    ds = torch.utils.data.TensorDataset(torch.randn(48, 8), torch.randn(48, 1))
    cb = FastgradCallback(histogram_every=2, log_every=3, run_dir=tmp_path / "fg")
    trainer = L.Trainer(max_steps=6, accumulate_grad_batches=2, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path, gradient_clip_val=1e-3, callbacks=[cb])
    trainer.fit(Tiny(), torch.utils.data.DataLoader(ds, batch_size=4))
    assert cb.monitor.closed
    run = read_run(tmp_path / "fg")
    # one record per optimizer step (not per micro-batch), layers named by module
    assert [s.step for s in run.steps] == list(range(6))
    assert run.layers == ["net.0", "net.2"]
    assert [s.histograms is not None for s in run.steps] == [True, False] * 3
    # recorded before Lightning's clipping at 1e-3: the raw norm is well above it
    assert min(s.total_norm for s in run.steps) > 1e-2


def test_lightning_callback_arguments():
    pytest.importorskip("lightning.pytorch")
    from fastgrad import GradMonitor
    from fastgrad.integrations.lightning import FastgradCallback

    with pytest.raises(TypeError):
        FastgradCallback(monitor=object())
    with pytest.raises(TypeError):
        FastgradCallback(monitor=GradMonitor(torch.nn.Linear(2, 2), loggers=()), every=2)


def test_transformers_callback_on_tiny_gpt2(tmp_path):
    transformers = pytest.importorskip("transformers")
    from fastgrad.integrations.transformers import FastgradTrainerCallback

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    model = transformers.GPT2LMHeadModel(cfg)
    ids = torch.randint(0, 64, (16, 12))
    ds = [{"input_ids": r, "labels": r} for r in ids]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-3,
        report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True,
        dataloader_num_workers=0, max_grad_norm=0.0,
    )
    class Recompute(transformers.TrainerCallback):
        """Independent truth: float64 norms of the gradients the optimizer step is about to use."""

        def __init__(self):
            self.total, self.block0, self.numel0 = [], [], []

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            sq = {name: p.grad.double().square().sum().item() for name, p in model.named_parameters()
                  if p.grad is not None}
            self.total.append(math.sqrt(math.fsum(sq.values())))
            mine = [n for n in sq if n.startswith("transformer.h.0.")]
            self.block0.append(math.sqrt(math.fsum(sq[n] for n in mine)))
            self.numel0.append(sum(p.numel() for n, p in model.named_parameters() if n in mine))

    cb = FastgradTrainerCallback(groups="block", histogram_every=2, log_every=2)
    check = Recompute()
    trainer = transformers.Trainer(model=model, args=args, train_dataset=ds, callbacks=[cb, check])
    trainer.train()
    assert cb.monitor.closed
    run = read_run(tmp_path / "fastgrad")
    assert [s.step for s in run.steps] == [0, 1, 2, 3]
    assert {"transformer.h.0", "transformer.h.1"} <= set(run.layers)
    assert len(check.total) == 4 and run.findings == []
    for s, total, block0, numel0 in zip(run.steps, check.total, check.block0, check.numel0):
        assert s.total_norm == pytest.approx(total, rel=1e-9) and total > 0
        i = s.layers.index("transformer.h.0")
        assert s.norm[i] == pytest.approx(block0, rel=1e-9) and s.numel[i] == numel0
    assert len({round(t, 12) for t in check.total}) == 4  # four different steps, not one repeated

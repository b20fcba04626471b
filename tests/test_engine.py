"""The shared training loop: loss goes down, seeded runs repeat, and resuming is bit-exact."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from training.engine import Trainer
from training.train_config import OptimConfig, TrainConfig


class Regression:
    """y = x·w + noise, with per-sample augmentation noise drawn from the sample RNG."""

    def __init__(self):
        rng = np.random.default_rng(0)
        self.x = rng.normal(size=(64, 4)).astype(np.float32)
        self.y = self.x @ np.array([1.0, -2.0, 0.5, 3.0], np.float32)

    def num_samples(self) -> int:
        return len(self.x)

    def load_sample(self, index, rng):
        return self.x[index] + rng.normal(0, 0.01, 4).astype(np.float32), self.y[index]

    def collate(self, samples):
        return torch.tensor(np.stack([s[0] for s in samples])), torch.tensor(np.array([s[1] for s in samples]))

    def losses(self, model, batch, generator):
        x, y = batch
        dropout = (torch.rand(x.shape, generator=generator) > 0.1).float()  # uses the step generator
        loss = ((model(x * dropout).squeeze(1) - y) ** 2).mean()
        return {"loss": loss}


def _cfg(epochs: int) -> TrainConfig:
    return TrainConfig(epochs=epochs, batch_size=8, seed=3, log_every=1000,
                       optim=OptimConfig(optimizer="sgd", lr=0.05, clip_grad=10.0))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(4, 1)


def test_loss_decreases_and_runs_repeat(tmp_path):
    history = Trainer(_model(), Regression(), _cfg(3), tmp_path / "a").fit()
    first, last = np.mean([h["loss"] for h in history[:4]]), np.mean([h["loss"] for h in history[-4:]])
    assert last < 0.2 * first
    again = Trainer(_model(), Regression(), _cfg(3), tmp_path / "b").fit()
    assert [h["loss"] for h in history] == [h["loss"] for h in again]
    assert (tmp_path / "a" / "model" / "model_last.pth").exists()


def test_resume_is_bit_exact(tmp_path):
    straight = Trainer(_model(), Regression(), _cfg(2), tmp_path / "straight")
    straight.fit()
    cfg = _cfg(2)
    cfg.save_every = 5
    interrupted = Trainer(_model(), Regression(), cfg, tmp_path / "resumed")
    interrupted.total_steps = 5  # stop after step 5 (a checkpoint is written there)
    interrupted.fit()
    resumed = Trainer(_model(), Regression(), cfg, tmp_path / "resumed")
    resumed.fit()
    assert resumed.step == straight.step == 16
    for a, b in zip(straight.module.state_dict().values(), resumed.module.state_dict().values()):
        assert torch.equal(a, b)
    assert [h["loss"] for h in straight.history] == [h["loss"] for h in resumed.history]

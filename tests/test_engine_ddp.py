"""The training loop under ``torchrun`` with 2 CPU processes (gloo on loopback), as multi-GPU runs launch it: the
ranks split every global batch disjointly, end with identical parameters equal to a one-process run over the same
global batches, log the global batch's loss, draw different step randomness, and only rank 0 writes checkpoints.

This file is also the worker script: torchrun runs it with the output folder as its argument."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from training.engine import Trainer
from training.train_config import OptimConfig, TrainConfig

REPO = Path(__file__).resolve().parents[1]
WORLD = 2


class Regression:
    """y = x·w with per-sample augmentation noise; records which samples it loaded and one step-generator draw."""

    def __init__(self):
        rng = np.random.default_rng(0)
        self.x = rng.normal(size=(16, 4)).astype(np.float32)
        self.y = self.x @ np.array([1.0, -2.0, 0.5, 3.0], np.float32)
        self.seen: list[int] = []
        self.draws: list[float] = []

    def num_samples(self) -> int:
        return len(self.x)

    def load_sample(self, index, rng):
        self.seen.append(index)
        return self.x[index] + rng.normal(0, 0.05, 4).astype(np.float32), self.y[index]

    def collate(self, samples):
        return torch.tensor(np.stack([s[0] for s in samples])), torch.tensor(np.array([s[1] for s in samples]))

    def losses(self, model, batch, generator):
        self.draws.append(float(torch.rand((), generator=generator)))
        x, y = batch
        err = model(x).squeeze(1) - y
        return {"loss": (err**2).mean(), "abs_err": err.abs().mean()}


def _cfg() -> TrainConfig:  # global batch 4 (2 per rank), 4 steps per epoch, 2 epochs
    return TrainConfig(epochs=2, batch_size=4, seed=5, log_every=1000,
                       optim=OptimConfig(optimizer="sgd", lr=0.02, clip_grad=10.0))


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


def _train(model: nn.Module, out: Path) -> tuple[Trainer, Regression]:
    task = Regression()

    def save_final(module: nn.Module, folder: Path) -> None:
        folder.mkdir(parents=True)
        torch.save(module.state_dict(), folder / "state.pt")

    trainer = Trainer(model, task, _cfg(), out, save_fn=save_final)
    trainer.fit()
    return trainer, task


def _worker(out: Path) -> None:
    """One torchrun rank: ranks start from different weights (DDP must broadcast rank 0's), own run folders."""
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    trainer, task = _train(_model(100 + rank), out / f"rank{rank}")
    torch.save({"state": trainer.module.state_dict(), "loss": [h["loss"] for h in trainer.history],
                "abs_err": [h["abs_err"] for h in trainer.history], "seen": task.seen, "draws": task.draws},
               out / f"result{rank}.pt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_match_one_process_over_the_same_global_batches(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(WORLD),
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), __file__, str(tmp_path)]
    run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"result{r}.pt", weights_only=True) for r in range(WORLD)]
    single, single_task = _train(_model(100), tmp_path / "single")
    steps = single.step
    assert steps == 8

    # every global batch is split disjointly over the ranks, and together they load what one process loads
    seen = [np.reshape(r["seen"], (steps, -1)) for r in ranks]
    for step, expected in enumerate(np.reshape(single_task.seen, (steps, -1))):
        assert sorted(np.concatenate([s[step] for s in seen])) == sorted(expected)
        assert all(len(s[step]) == len(expected) // WORLD for s in seen)

    # DDP keeps the replicas identical (rank 1 started from other weights), equal to the one-process run
    for key, value in ranks[0]["state"].items():
        assert torch.equal(value, ranks[1]["state"][key]), key
        torch.testing.assert_close(value, single.module.state_dict()[key], atol=1e-6, rtol=1e-5)
    assert not torch.equal(ranks[0]["state"]["0.weight"], _model(100)[0].weight.detach())  # it did train

    # logged scalars are the global batch's, on every rank
    for r in ranks:
        np.testing.assert_allclose(r["loss"], [h["loss"] for h in single.history], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(r["abs_err"], [h["abs_err"] for h in single.history], rtol=1e-5, atol=1e-7)
    # rank 0 keeps the one-process step randomness, rank 1 draws its own (no identical masks / rays)
    assert ranks[0]["draws"] == single_task.draws
    assert all(a != b for a, b in zip(ranks[0]["draws"], ranks[1]["draws"]))

    # checkpoints and TensorBoard come from rank 0 only, once, holding the trained weights
    assert not (tmp_path / "rank1").exists()
    last = torch.load(tmp_path / "rank0" / "model" / "model_last.pth", weights_only=True)
    assert last["global_step"] == steps
    for key, value in ranks[0]["state"].items():
        assert torch.equal(last["state_dict"][f"module.{key}"], value)
    final = torch.load(tmp_path / "rank0" / "final" / "state.pt", weights_only=True)
    assert all(torch.equal(final[k], v) for k, v in ranks[0]["state"].items())
    assert (tmp_path / "rank0" / "tensorboard").is_dir()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))

"""One training loop for every task (rendering pre-training, segmentation, detection).

Determinism and exact resume come from construction, not from saved RNG streams: the sample order of
epoch e is a permutation drawn from ``(seed, e)``, the augmentation RNG of each sample from
``(seed, e, step, index)``, and the torch generator of each step from ``(seed, e, step)``. A checkpoint
written after step k therefore resumes bit-exactly at step k+1 (model, optimizer, scheduler, scaler and
the step counter are restored).

Multi-GPU / multi-node: launch with ``torchrun``; each rank takes a disjoint slice of every global
batch, gradients are averaged by DistributedDataParallel, rank 0 writes checkpoints and TensorBoard.
Sample augmentation RNGs do not depend on the rank (a sample is augmented alike however the batch is split);
the step generator of rank r > 0 also mixes in r, so ranks do not draw identical masks and rays. Logged
scalars are averaged over ranks, i.e. they describe the global batch (tests/test_engine_ddp.py).
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)


@dataclass
class OptimConfig:
    """SGD + OneCycleLR as the official configs (pct_start 0.05, cosine, div 10, final_div 1e4)."""

    optimizer: str = "sgd"              # "sgd" or "adamw"
    lr: float = 0.05
    weight_decay: float = 1e-4
    momentum: float = 0.9
    nesterov: bool = True
    pct_start: float = 0.05
    div_factor: float = 10.0
    final_div_factor: float = 1e4
    clip_grad: float | None = None      # max gradient norm
    amp: bool = True                    # used only on CUDA


@dataclass
class TrainConfig:
    epochs: int = 1
    steps_per_epoch: int | None = None  # default: ceil(num_samples / batch_size)
    batch_size: int = 2
    seed: int = 0
    device: str = "cpu"
    num_workers: int = 0
    log_every: int = 10
    save_every: int = 0                 # steps between checkpoints (0: at every epoch end only)
    optim: OptimConfig = field(default_factory=OptimConfig)


class TrainTask(Protocol):
    """What a task gives the loop: samples, collation, and the loss of a batch."""

    def num_samples(self) -> int: ...

    def load_sample(self, index: int, rng: np.random.Generator) -> Any: ...

    def collate(self, samples: list[Any]) -> Any: ...

    def losses(self, model: nn.Module, batch: Any, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Forward pass; the dict must hold ``loss`` (what is optimised) and may hold logged scalars."""


def seeded_rng(*parts: int) -> np.random.Generator:
    return np.random.default_rng([int(p) for p in parts])


def step_generator(device: torch.device, *parts: int) -> torch.Generator:
    gen = torch.Generator(device=device if device.type == "cuda" else "cpu")
    gen.manual_seed(int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0]) >> 1)
    return gen


def join_process_group(device: str) -> None:
    """Under torchrun (WORLD_SIZE > 1): join the process group once per process ("nccl" on CUDA, each rank on
    its LOCAL_RANK GPU; else "gloo") and destroy it at exit. A gloo group left for interpreter teardown can
    abort a rank after its work is done ("terminate called without an active exception", seen in CI)."""
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1 or torch.distributed.is_initialized():
        return
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))  # else every rank's NCCL communicator lands on GPU 0
    torch.distributed.init_process_group("nccl" if device == "cuda" else "gloo")
    atexit.register(_leave_process_group)


def _leave_process_group() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


class _EpochBatches(torch.utils.data.Dataset):
    """Item s of epoch e = the collated batch of step s (this rank's slice), built with seeded RNGs."""

    def __init__(self, task: TrainTask, cfg: TrainConfig, epoch: int, steps: int, rank: int, world: int):
        self.task, self.cfg, self.epoch, self.steps, self.rank, self.world = task, cfg, epoch, steps, rank, world
        n = task.num_samples()
        order = seeded_rng(cfg.seed, epoch).permutation(n)
        reps = math.ceil(steps * cfg.batch_size / max(n, 1))
        self.order = np.concatenate([order] * max(reps, 1))

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, step: int):
        start = step * self.cfg.batch_size
        indices = self.order[start:start + self.cfg.batch_size][self.rank::self.world]
        samples = [self.task.load_sample(int(i), seeded_rng(self.cfg.seed, self.epoch, step, int(i))) for i in indices]
        return self.task.collate(samples)


class Trainer:
    def __init__(self, model: nn.Module, task: TrainTask, cfg: TrainConfig, out_dir: str | Path,
                 save_fn=None):
        """``save_fn(model, out_dir)`` writes the final checkpoint in our format (the task knows its config)."""
        self.cfg, self.task, self.out_dir, self.save_fn = cfg, task, Path(out_dir), save_fn
        self.rank, self.world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if cfg.batch_size < self.world:
            raise ValueError(f"batch_size is the global batch, split over the {self.world} processes; it must be at "
                             f"least {self.world}, got {cfg.batch_size}")
        join_process_group(cfg.device)
        self.device = torch.device(f"cuda:{local_rank}" if cfg.device == "cuda" else cfg.device)
        torch.manual_seed(cfg.seed)
        self.model = model.to(self.device)
        self.module = self.model
        if self.world > 1:
            self.model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[local_rank] if self.device.type == "cuda" else None,
                broadcast_buffers=False, find_unused_parameters=True)
        n = task.num_samples()
        self.steps_per_epoch = cfg.steps_per_epoch or max(1, math.ceil(n / cfg.batch_size))
        self.total_steps = self.steps_per_epoch * cfg.epochs
        o = cfg.optim
        params = [p for p in self.module.parameters() if p.requires_grad]
        if o.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay,
                                             nesterov=o.nesterov)
        elif o.optimizer == "adamw":
            self.optimizer = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
        else:
            raise ValueError(f"unknown optimizer {o.optimizer!r}; use 'sgd' or 'adamw'")
        if self.total_steps >= 4:
            # OneCycleLR needs at least two warm-up and two annealing steps; short runs warm up longer
            pct_start = min(max(o.pct_start, 2.0 / self.total_steps), 1 - 2.0 / self.total_steps)
            self.scheduler = torch.optim.lr_scheduler.OneCycleLR(
                self.optimizer, max_lr=o.lr, total_steps=self.total_steps, pct_start=pct_start,
                anneal_strategy="cos", div_factor=o.div_factor, final_div_factor=o.final_div_factor)
        else:  # too short for a schedule (smoke runs): constant learning rate
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: 1.0)
        self.use_amp = o.amp and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.step = 0  # global steps done
        self.history: list[dict[str, float]] = []
        self._writer = None

    # --- checkpoints -------------------------------------------------------------------------------
    @property
    def last_path(self) -> Path:
        return self.out_dir / "model" / "model_last.pth"

    def save(self) -> None:
        """The official container (``module.`` keys) plus our resume fields."""
        if self.rank != 0:
            return
        from model.checkpoint import save_official

        save_official(self.module, self.last_path, epoch=self.step // self.steps_per_epoch, extra={
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.use_amp else None,
            "global_step": self.step, "history": [{k: float(v) for k, v in h.items()} for h in self.history]})

    def resume(self) -> bool:
        if not self.last_path.exists():
            return False
        ckpt = torch.load(self.last_path, map_location=self.device, weights_only=True)
        state = {k.removeprefix("module."): v for k, v in ckpt["state_dict"].items()}
        self.module.load_state_dict(state, strict=True)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.use_amp and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.step = int(ckpt["global_step"])
        self.history = list(ckpt.get("history", []))
        log.info("resumed from %s at step %d", self.last_path, self.step)
        return True

    # --- loop --------------------------------------------------------------------------------------
    def _log(self, record: dict[str, float]) -> None:
        if self.rank != 0:
            return
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.out_dir / "tensorboard"))
        for key, value in record.items():
            if key != "step":
                self._writer.add_scalar(f"train/{key}", value, int(record["step"]))

    def fit(self, resume: bool = True) -> list[dict[str, float]]:
        from tqdm import tqdm

        if resume:
            self.resume()
        self.model.train()
        progress = tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step",
                        disable=self.rank != 0 or not os.isatty(2))
        while self.step < self.total_steps:
            epoch, first = divmod(self.step, self.steps_per_epoch)
            batches = _EpochBatches(self.task, self.cfg, epoch, self.steps_per_epoch, self.rank, self.world)
            loader = torch.utils.data.DataLoader(
                torch.utils.data.Subset(batches, range(first, self.steps_per_epoch)), batch_size=None,
                shuffle=False, num_workers=self.cfg.num_workers)
            for batch in loader:
                in_epoch = self.step % self.steps_per_epoch
                rank = (self.rank,) if self.rank else ()  # rank 0 (and a single process) keeps the plain seed
                record = self._train_step(batch, step_generator(self.device, self.cfg.seed, epoch, in_epoch, *rank))
                self.step += 1
                record["step"] = self.step
                self.history.append(record)
                self._log(record)
                progress.update()
                progress.set_postfix(loss=f"{record['loss']:.4f}")
                if self.step % max(self.cfg.log_every, 1) == 0:
                    log.info("step %d/%d %s", self.step, self.total_steps,
                             " ".join(f"{k}={v:.4g}" for k, v in record.items() if k != "step"))
                if self.cfg.save_every and self.step % self.cfg.save_every == 0:
                    self.save()
            self.save()
        progress.close()
        if self._writer is not None:
            self._writer.close()
        if self.save_fn is not None and self.rank == 0:
            self.save_fn(self.module, self.out_dir / "final")
        if self.world > 1:
            torch.distributed.barrier()  # no rank returns before rank 0 has written the final checkpoint
        return self.history

    def _train_step(self, batch: Any, generator: torch.Generator) -> dict[str, float]:
        start = time.perf_counter()
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.use_amp):
            losses = self.task.losses(self.model, _to(batch, self.device), generator)
        loss = losses["loss"]
        scalars = {k: v.detach().float() for k, v in losses.items() if v.numel() == 1}
        if self.world > 1:  # the global batch's values (as DDP averages the gradients), not this rank's slice;
            stacked = torch.stack([v.reshape(()) for v in scalars.values()])  # before backward, so a non-finite
            torch.distributed.all_reduce(stacked)                             # loss on one rank stops every rank
            scalars = dict(zip(scalars, stacked / self.world))                # instead of leaving them waiting
        record = {k: float(v) for k, v in scalars.items()}
        if not math.isfinite(record["loss"]):
            raise FloatingPointError(f"loss became {record['loss']} at step {self.step}")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.cfg.optim.clip_grad:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg.optim.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        record["lr"] = self.scheduler.get_last_lr()[0]
        record["time"] = time.perf_counter() - start
        return record


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to(v, device) for v in batch)
    return batch

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
from pathlib import Path
from typing import Any, Mapping, Protocol

import numpy as np
import torch
from torch import nn

from training.train_config import TrainConfig

log = logging.getLogger(__name__)


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


class TrainingDiverged(FloatingPointError, ValueError):
    """The loss or the weights stopped being finite: a user-fixable setting (lr, clipping), so the CLI shows
    it as one line (a ValueError) while callers that catch FloatingPointError keep working."""


class ResumeError(ValueError):
    """``--resume`` found a run whose container does not fit this config (model, optimizer, schedule)."""


class Trainer:
    def __init__(self, model: nn.Module, task: TrainTask, cfg: TrainConfig, out_dir: str | Path,
                 save_fn=None, model_config: Mapping[str, Any] | None = None):
        """``save_fn(model, out_dir)`` writes the final checkpoint in our format (the task knows its config).
        ``model_config`` (``ModelConfig.to_dict()``) is stored in the official container as ``ponder_config``
        so ``model_last.pth`` reads back with the exact architecture and render geometry, not an inferred one."""
        self.cfg, self.task, self.out_dir, self.save_fn = cfg, task, Path(out_dir), save_fn
        self.model_config = _plain(model_config) if model_config is not None else None
        cfg.validate()  # the configs check at load; this covers settings built in code
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
        self._peak = 0.0  # largest weight magnitude after the last optimizer step
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

        extra = {
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.use_amp else None,
            "global_step": self.step, "history": [{k: float(v) for k, v in h.items()} for h in self.history],
            "optimizer_name": self.cfg.optim.optimizer, "total_steps": self._schedule_steps()}
        if self.model_config is not None:
            extra["ponder_config"] = self.model_config
        save_official(self.module, self.last_path, epoch=self.step // self.steps_per_epoch, extra=extra)

    def resume(self) -> bool:
        """Continue from ``model_last.pth`` when it exists (False, said in the log, when it does not). The file
        is read weights-only; a damaged file, another architecture, optimizer or schedule is a one-line
        ``CheckpointError``/``ResumeError`` (raised before the optimizer state or the step are restored; the
        caller writes nothing to the run until this returns)."""
        if not self.last_path.exists():
            log.info("no checkpoint at %s; starting from scratch", self.last_path)
            return False
        from model.checkpoint import load_state_strict

        ckpt = _read_container(self.last_path)
        state = {k.removeprefix("module."): v for k, v in ckpt["state_dict"].items()}
        try:
            load_state_strict(self.module, state, str(self.last_path))
        except ValueError as exc:
            raise ResumeError(f"{exc}; --resume needs the model the run started with: start a new --out "
                              "or use --init") from None
        self._check_resumable(ckpt)
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
            if self.use_amp and ckpt.get("scaler"):
                self.scaler.load_state_dict(ckpt["scaler"])
        except (KeyError, ValueError, TypeError, RuntimeError) as exc:
            raise ResumeError(f"{self.last_path}: the optimizer state does not fit this config ({exc}); start a "
                              "new --out or use --init") from None
        self.step = int(ckpt["global_step"])
        self.history = list(ckpt.get("history", []))
        self._peak = _peak_weight(self.module.parameters())
        log.info("resumed from %s at step %d", self.last_path, self.step)
        return True

    def _check_resumable(self, ckpt: dict[str, Any]) -> None:
        """The optimizer type and the schedule length must be the run's: torch would fail only at a later step
        (``KeyError: 'momentum'``, "Tried to step 41 times") or silently remap the epochs."""
        saved = ckpt.get("optimizer_name") or _optimizer_kind(ckpt["optimizer"])
        if saved is not None and saved != self.cfg.optim.optimizer:
            raise ResumeError(f"optimizer changed from {saved} to {self.cfg.optim.optimizer}; --resume needs the "
                              "optim section the run started with: start a new --out or use --init")
        one_cycle = "total_steps" in ckpt["scheduler"]  # else the constant rate of runs under 4 steps
        total = ckpt["scheduler"]["total_steps"] if one_cycle else ckpt.get("total_steps")
        same_kind = one_cycle == isinstance(self.scheduler, torch.optim.lr_scheduler.OneCycleLR)
        if not same_kind or (total is not None and int(total) != self._schedule_steps()):
            started = f"{int(total)} step{'s' * (int(total) != 1)}" if total is not None else "under 4 steps"
            raise ResumeError(f"--resume needs the schedule the run started with ({started}); this config gives "
                              f"{self.total_steps} (epochs x steps_per_epoch); start a new --out or use --init")

    def _schedule_steps(self) -> int:
        """The steps the learning-rate schedule was built for (OneCycleLR cannot be stepped past them)."""
        return int(getattr(self.scheduler, "total_steps", self.total_steps))

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
        try:
            with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.use_amp):
                losses = self.task.losses(self.model, _to(batch, self.device), generator)
        except (IndexError, RuntimeError) as exc:
            # finite but exploded weights make NaN coordinates deep in a forward pass (an index out of range in
            # trilinear sampling): that is the divergence, not a bug to show as a traceback
            if self._peak > EXPLODED:
                reason = " ".join(str(exc).split())[:200]
                raise self._diverged(f"the weights grew to {self._peak:.3g} and the forward pass failed "
                                     f"({type(exc).__name__}: {reason})") from exc
            raise
        loss = losses["loss"]
        scalars = {k: v.detach().float() for k, v in losses.items() if v.numel() == 1}
        if self.world > 1:  # the global batch's values (as DDP averages the gradients), not this rank's slice;
            stacked = torch.stack([v.reshape(()) for v in scalars.values()])  # before backward, so a non-finite
            torch.distributed.all_reduce(stacked)                             # loss on one rank stops every rank
            scalars = dict(zip(scalars, stacked / self.world))                # instead of leaving them waiting
        record = {k: float(v) for k, v in scalars.items()}
        if not math.isfinite(record["loss"]):
            raise self._diverged(f"loss became {record['loss']}")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.cfg.optim.clip_grad:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg.optim.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self._peak = _peak_weight(self.module.parameters())
        if not math.isfinite(self._peak):  # else NaN weights reach the next step (or the renderer)
            raise self._diverged("the weights became non-finite after the optimizer step")
        self.scheduler.step()
        record["lr"] = self.scheduler.get_last_lr()[0]
        record["time"] = time.perf_counter() - start
        return record

    def _diverged(self, what: str) -> TrainingDiverged:
        """The one-line error of a diverging run, with the settings that usually fix it."""
        clip = "lower train.optim.clip_grad" if self.cfg.optim.clip_grad else "set train.optim.clip_grad"
        return TrainingDiverged(f"training diverged at step {self.step + 1}: {what}; lower train.optim.lr or {clip}")


# Weights larger than this in magnitude (no trained network comes close) explain a failing forward pass.
EXPLODED = 1e6


def _peak_weight(params: Any) -> float:
    """The largest parameter magnitude (NaN or inf when any is not finite), with one device sync."""
    peaks = [p.detach().abs().max().float() for p in params if p.numel()]
    return float(torch.stack(peaks).max()) if peaks else 0.0


def _plain(value: Any) -> Any:
    """``value`` as str/int/float/bool/None/list/dict only, which ``torch.load(weights_only=True)`` reads."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    raise TypeError(f"model_config holds a {type(value).__name__}; pass ModelConfig.to_dict()")


def _optimizer_kind(state: Any) -> str | None:
    """"sgd" or "adamw" from an optimizer state_dict's hyper-parameters (containers written before the name was
    stored), None when it cannot tell."""
    groups = state.get("param_groups") if isinstance(state, dict) else None
    if not groups:
        return None
    return "adamw" if "betas" in groups[0] else "sgd" if "momentum" in groups[0] else None


_RESUME_KEYS = ("state_dict", "optimizer", "scheduler", "global_step")


def _read_container(path: Path) -> dict[str, Any]:
    """The engine's container, read weights-only as every user file is (`model.checkpoint.load_torch_file`): a
    damaged or foreign file is a ``CheckpointError`` naming it, not torch's traceback."""
    from model.checkpoint import CheckpointError, load_torch_file

    try:
        ckpt = load_torch_file(path)
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}; --resume cannot continue this run") from None
    missing = [k for k in _RESUME_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing or not isinstance(ckpt["state_dict"], dict) or not isinstance(ckpt["scheduler"], dict):
        raise CheckpointError(f"{path}: not a resumable training container (missing {missing or 'state'}); "
                              "--resume cannot continue this run")
    return ckpt


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to(v, device) for v in batch)
    return batch

"""The training loop's settings: the ``train`` section of every task config (``optim`` inside it), checked
before a run folder exists so a bad value costs one line, not a run."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from model.config_io import ConfigError


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

    def validate(self, where: str = "train.optim") -> None:
        """The optimizer name and the numbers torch would take silently (a NaN lr) or refuse mid-run."""
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"{where}.optimizer must be one of {list(OPTIMIZERS)}, got {self.optimizer!r}")
        _positive(f"{where}.lr", self.lr)
        _positive(f"{where}.weight_decay", self.weight_decay, allow_zero=True)
        _positive(f"{where}.momentum", self.momentum, allow_zero=True)
        _positive(f"{where}.div_factor", self.div_factor)
        _positive(f"{where}.final_div_factor", self.final_div_factor)
        if not 0 < self.pct_start < 1:
            raise ConfigError(f"{where}.pct_start must lie in (0, 1), got {self.pct_start}")
        if self.clip_grad is not None:
            _positive(f"{where}.clip_grad (null: no clipping)", self.clip_grad)


OPTIMIZERS = ("sgd", "adamw")


@dataclass
class TrainConfig:
    """The loop's settings (the ``train`` section of every task config). ``steps_per_epoch`` 0 or null means
    derived from the data: ``ceil(num_samples / batch_size)``."""

    epochs: int = 1
    steps_per_epoch: int | None = None  # 0 or None: ceil(num_samples / batch_size)
    batch_size: int = 2
    seed: int = 0
    device: str = "cpu"
    num_workers: int = 0
    log_every: int = 10
    save_every: int = 0                 # steps between checkpoints (0: at every epoch end only)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def validate(self, where: str = "train") -> None:
        """Refuse values the loop would misread (0 epochs trains nothing yet "succeeds") or that torch would
        reject only after the run folder exists; one ``ConfigError`` naming the field."""
        _at_least(f"{where}.epochs", self.epochs, 1)
        _at_least(f"{where}.steps_per_epoch", 0 if self.steps_per_epoch is None else self.steps_per_epoch, 0)
        _at_least(f"{where}.batch_size", self.batch_size, 1)
        _at_least(f"{where}.num_workers", self.num_workers, 0)
        _at_least(f"{where}.log_every", self.log_every, 1)
        _at_least(f"{where}.save_every", self.save_every, 0)
        from model.devices import parse_device

        try:
            parse_device(self.device)
        except ValueError as exc:
            raise ConfigError(f"{where}.device: {exc}") from None
        self.optim.validate(f"{where}.optim")


def _at_least(name: str, value: int, low: int) -> None:
    if value < low:
        raise ConfigError(f"{name} must be >= {low}, got {value}")


def _positive(name: str, value: float, allow_zero: bool = False) -> None:
    """Finite and > 0 (>= 0 with ``allow_zero``): NaN or inf would reach the optimizer unnoticed."""
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{name} must be a finite number {'>=' if allow_zero else '>'} 0, got {value}")


def check_threads(threads: int | None, name: str = "threads") -> None:
    """A config's torch CPU ``threads`` (null: torch's default); torch refuses < 1 with a traceback."""
    if threads is not None:
        _at_least(name, threads, 1)

"""The steps every training command shares (``ponder train pretrain|segment|detect``, ``ponder images
train|train-segment``), kept in one place so the commands cannot drift apart:

* ``add_command``: wire one subcommand (parser, its arguments, its handler);
* ``apply_overrides``: copy the flags a user gave onto the loaded config (a flag left out keeps the YAML value);
* ``open_run``: the train section (after the flags), torch threads, the device check and the run folder, which
  is never silently overwritten;
* ``fit_and_report``: resume (checked before anything is written), write the run's ``config.yaml``, train with
  ``training.engine.Trainer`` and print the loss summary and checkpoint line that tests and README commands read;
* ``check_json_output`` / ``write_json``: an output file (``--json``) checked before the work, written atomically.

Heavy dependencies (torch, yaml, the engine) are imported inside the functions so that importing a command
module, as ``ponder --help`` does, stays quick.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from model.devices import torch_device

log = logging.getLogger(__name__)


def add_command(subparsers: argparse._SubParsersAction, name: str, help: str,
                add_arguments: Callable[[argparse.ArgumentParser], None],
                handler: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
    """Add subcommand ``name`` with its arguments and handler: the three steps every command module repeated
    per subcommand."""
    parser = subparsers.add_parser(name, help=help)
    add_arguments(parser)
    parser.set_defaults(handler=handler)
    return parser


def apply_overrides(args: argparse.Namespace, cfg: Any, fields: Mapping[str, str]) -> None:
    """Copy each flag of ``fields`` (flag dest -> dotted config field, e.g. ``{"device": "train.device"}``) that
    the user gave (not None) onto ``cfg``. One rule for every command: a flag left out keeps the YAML's value.
    Paths are stored as strings, the type the configs read from YAML."""
    for flag, field in fields.items():
        value = getattr(args, flag)
        if value is None:
            continue
        *sections, name = field.split(".")
        target = cfg
        for section in sections:
            target = getattr(target, section)
        setattr(target, name, str(value) if isinstance(value, Path) else value)


def set_threads(cfg: Any) -> None:
    """Apply the config's ``threads`` (torch CPU threads; configs without the field leave torch's default):
    one thread avoids thrashing a busy, shared CPU."""
    from training.train_config import check_threads

    threads = getattr(cfg, "threads", None)
    check_threads(threads)
    if threads:
        import torch

        torch.set_num_threads(threads)


@dataclass(frozen=True)
class RunFolder:
    """A training run's folder: ``out`` holds ``config.yaml``, ``final/`` and ``model/``; ``last`` is the
    engine's container of the latest step, which ``--resume`` continues from."""

    out: Path
    last: Path

    def write_config(self, document: Mapping[str, Any]) -> None:
        """Record the configuration the run used as ``config.yaml`` (creating the folder), atomically: an
        interrupted write must not leave a run folder whose config no longer describes its checkpoint."""
        import yaml

        from model.files import replaced_on_success

        with replaced_on_success(self.out / "config.yaml") as tmp:
            tmp.write_text(yaml.safe_dump(document, sort_keys=False))


def open_run(args: argparse.Namespace, cfg: Any) -> RunFolder:
    """Threads, a clear error for CUDA without a GPU (before any data is generated or read), and the run folder
    (``--out``, else the config's ``out_dir``). A folder that already holds a run is refused unless
    ``--resume`` is given, so a finished run is never overwritten by accident. Every check runs before the
    folder exists, so a bad setting leaves nothing behind."""
    cfg.train.validate()  # again: the flags (--epochs, --device) were applied after the config was loaded
    set_threads(cfg)
    torch_device(cfg.train.device)
    out = Path(args.out or cfg.out_dir)
    if out.exists() and not out.is_dir():
        option = "--out" if args.out else "out_dir"
        raise NotADirectoryError(f"{option} must be a folder; {out} is a file")
    last = out / "model" / "model_last.pth"
    if last.exists() and not args.resume:
        raise ValueError(f"{out} already holds a run ({last}); pass --resume to continue it or choose another --out")
    if args.resume and not last.exists():
        log.warning("--resume: %s holds no run yet (no %s); starting from scratch", out, last)
    return RunFolder(out, last)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The config file as the user wrote it (what ``config.yaml`` records for commands whose overrides do not
    change the model), with the same one-line errors as loading it."""
    from training.config_io import read_yaml as read_config

    return read_config(path)


def check_json_output(path: Path | None) -> None:
    """``--json PATH`` checked before the (possibly long) work, not after it (`model.files.check_output_file`)."""
    if path is not None:
        from model.files import check_output_file

        check_output_file(path, "--json")


def write_json(path: Path, document: Any) -> None:
    """``document`` as indented JSON, replacing ``path`` only once it is complete (creating its folder)."""
    from model.files import replaced_on_success

    with replaced_on_success(path) as tmp:
        tmp.write_text(json.dumps(document, indent=2))


@dataclass(frozen=True)
class Metric:
    """A logged scalar that the training summary reports next to the loss, e.g. ``psnr 12.00 -> 18.00 dB``."""

    label: str
    key: str
    digits: int
    unit: str = ""


PSNR = Metric("psnr", "psnr", 2, " dB")  # the rendering pre-training commands' (points and images)

def checkpoint_line(final: Path, last: Path, container: str) -> str:
    """The last line of every training command: where the model and the resumable container are."""
    return f"checkpoint: {final} ({container} container: {last})"


def fit_and_report(run: RunFolder, model: Any, task: Any, train_cfg: Any, save_fn: Callable[[Any, Path], Any], *,
                   resume: bool, document: Mapping[str, Any], samples: str, metric: Metric | None,
                   container: str, model_config: Mapping[str, Any] | None = None) -> None:
    """Resume (its checks fail before anything is written), write ``config.yaml``, train, and (on rank 0 of a
    torchrun job only, like the engine's checkpoints and logs) print the loss summary over
    ``task.num_samples()`` ``samples`` and the checkpoint line. ``model_config`` (``ModelConfig.to_dict()``)
    goes into the official container, so ``model_last.pth`` reads back exactly."""
    from training.engine import Trainer

    trainer = Trainer(model, task, train_cfg, run.out, save_fn=save_fn, model_config=model_config)
    if resume:
        trainer.resume()
    if trainer.rank == 0:
        run.write_config(document)
    history = trainer.fit(resume=False)
    if trainer.rank != 0:
        return
    if history:
        first, final = history[0], history[-1]
        line = (f"trained {trainer.step} steps on {task.num_samples()} {samples}: loss {first['loss']:.4f} -> "
                f"{final['loss']:.4f}")
        if metric is not None:
            nan = float("nan")
            line += (f", {metric.label} {first.get(metric.key, nan):.{metric.digits}f} -> "
                     f"{final.get(metric.key, nan):.{metric.digits}f}{metric.unit}")
        print(line)
    print(checkpoint_line(run.out / "final", run.last, container))


def run_training(args: argparse.Namespace, cfg: Any, *, overrides: Mapping[str, str],
                 ensure_data: Callable[[Any], None], make_task: Callable[[Any], Any],
                 build_model: Callable[[Any], Any], save_fn: Callable[[Any, Path], Any], samples: str,
                 metric: Metric | None, container: str,
                 model_config: Callable[[Any], Mapping[str, Any]] | None = None) -> RunFolder:
    """A whole training command whose model and task are built from the config alone: apply the flags, open the
    run folder, generate missing synthetic data, build the task then the model (model weights draw from torch's
    RNG after the task, as they always have), record the YAML as given, train and report. Commands with extra
    steps (detection, segmentation fine-tuning) use the pieces above instead. ``model_config(cfg)`` gives the
    ``ModelConfig.to_dict()`` stored in the official container (tasks whose model is a ModelConfig)."""
    apply_overrides(args, cfg, overrides)
    run = open_run(args, cfg)
    ensure_data(cfg)
    task = make_task(cfg)
    model = build_model(cfg)
    fit_and_report(run, model, task, cfg.train, save_fn, resume=args.resume, document=read_yaml(args.config),
                   samples=samples, metric=metric, container=container,
                   model_config=model_config(cfg) if model_config is not None else None)
    return run

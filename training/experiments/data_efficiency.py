"""Data-efficient fine-tuning: PonderV2's "limited labels" experiment at CPU size, printed as a table.

Segmentation mIoU/allAcc and detection mAP@0.25/0.5 after fine-tuning (a) rendering-pre-trained encoders (one or
several checkpoints of one architecture) and (b) the same architecture from random initialisation, with 1 %, 5 %
and 100 % of the labels, on generated scenes held out from pre-training.

    python -m training.experiments.data_efficiency --pretrained runs/pretrain-small-cpu/final [--out DIR]
        [--data DIR | --scenes 16 --data-seed 1] [--fractions 0.01 0.05 1] [--tasks segment detect] [--quick]
    python -m training.experiments.data_efficiency --pretrained small=CKPT1 medium=CKPT2 ...   # compare several

* Held out: without ``--data`` the scenes are generated with ``--data-seed`` (default 1). Scene i of a dataset
  is drawn from SeedSequence([seed, i]), so any seed other than the pre-training data's gives unseen rooms.
* Label fractions: segmentation keeps a seeded random share of every training scene's labelled points (the
  rest are ignored, -1); detection (training/detect) trains on a seeded share of the training scenes (at least
  one), since its boxes come per scene.
* Same optimisation budget: every detection run takes as many steps as the 100 % run (``--detect-steps``,
  default the detection config's epochs over the full training set), so a 1-scene run sees that scene
  many times instead of stopping after a few steps; segmentation runs all keep every scene, hence the same steps.
* All arms use the pre-trained checkpoints' (one) architecture and input features; the YAML configs
  (segment-small-cpu.yaml, detect-small-cpu.yaml) give the schedules, heads and voxel sizes (segmentation at the
  pre-training's 2 cm, detection at its config's 8 cm, as the bundled default model).
* Every run lives in ``<out>/<task>/<init>-<percent>`` (init: pretrained[-LABEL] or random); a finished run is
  reused when the script is run again, so ``--no-random`` runs of a new checkpoint can join an existing folder.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import sys
from pathlib import Path

import yaml

log = logging.getLogger(__name__)
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
METRICS = {"segmentation": ("mIoU", "allAcc"), "detection": ("mAP@0.25", "mAP@0.5")}
Results = dict[tuple[str, str, str, float], "float | None"]  # (task, metric, init, fraction) -> value in [0, 1]


@dataclasses.dataclass(frozen=True)
class Arm:
    """One initialisation: a pre-trained checkpoint, or random (``checkpoint`` None)."""

    name: str  # "pretrained", "pretrained-<label>" or "random"; also the run folders' prefix
    checkpoint: Path | None


def parse_arms(values: list[str], random: bool = True) -> list[Arm]:
    """``--pretrained PATH`` -> [pretrained, random]; ``--pretrained small=P1 medium=P2`` -> one arm per label."""
    arms = []
    for value in values:
        label, sep, path = value.partition("=")
        if not sep:
            label, path = "", value
        arms.append(Arm(f"pretrained-{label}" if label else "pretrained", Path(path)))
    names = [a.name for a in arms]
    if len(set(names)) != len(names) or (len(arms) > 1 and "pretrained" in names):
        raise ValueError(f"--pretrained: give one PATH or distinct LABEL=PATH pairs, got {values}")
    return arms + ([Arm("random", None)] if random else [])


def _architecture(cfg) -> tuple:
    """What the arms must share; a fine-tune drops any classifier, so num_classes does not count."""
    return dataclasses.replace(cfg.backbone, num_classes=0), tuple(cfg.input_features)


def prepare_data(args: argparse.Namespace) -> Path:
    if args.data is not None:
        if not Path(args.data).is_dir():
            raise FileNotFoundError(f"{args.data}: no such data folder")
        return Path(args.data)
    from training.data.synthetic import SceneConfig, generate_dataset

    root = args.out / "data"
    if not (root / "val.txt").is_file():
        log.info("generating %d held-out scenes (seed %d) into %s", args.scenes, args.data_seed, root)
        generate_dataset(root, args.scenes, args.data_seed, SceneConfig(num_frames=0),
                         splits=(("train", 0.75), ("val", 0.25)), progress=False)
    return root


def run_segmentation(args: argparse.Namespace, arm: Arm, fraction: float, data: Path, source) -> dict[str, float]:
    """mIoU and allAcc (fast protocol, all val points) of one fine-tune; the run folder caches the result."""
    from training.segment.config import load_config
    from training.segment.task import fine_tune

    out = args.out / "segment" / f"{arm.name}-{_pct(fraction)}"
    done = out / "metrics.json"
    if done.is_file():
        return _metrics(done, "segmentation")
    cfg = load_config(args.segment_config)
    cfg.data.root, cfg.data.label_fraction, cfg.data.label_mode = str(data), fraction, "points"
    if arm.checkpoint is not None:
        cfg.init.checkpoint = str(arm.checkpoint)
    else:  # the same network, randomly initialised
        cfg.init.checkpoint = None
        cfg.model.backbone = dataclasses.replace(source.backbone, num_classes=0)
        cfg.model.grid_size, cfg.model.input_features = source.grid_size, tuple(source.input_features)
    cfg.evaluate.mode = "precise" if args.precise else "fast"
    if args.quick:
        cfg.train.epochs, cfg.train.steps_per_epoch, cfg.evaluate.max_scenes = 1, 3, 1
    cfg.validate()
    result = fine_tune(cfg, out, resume=True)
    done.write_text(json.dumps({"mode": cfg.evaluate.mode, **result.metrics.as_dict()}, indent=2))
    return _metrics(done, "segmentation")


def run_detection(args: argparse.Namespace, arm: Arm, fraction: float, data: Path, source) -> dict[str, float]:
    """mAP@0.25 and mAP@0.5 of one detection fine-tune through ``ponder train detect`` (training/detect)."""
    from training.detect.cli import add_train_arguments, run_train

    out = args.out / "detect" / f"{arm.name}-{_pct(fraction)}"
    done = out / "metrics.json"
    if not done.is_file():
        cfg = yaml.safe_load(Path(args.detect_config).read_text())
        cfg["out_dir"] = str(out)
        cfg.setdefault("data", {}).update(root=str(data), generate=None, label_fraction=fraction)
        model = cfg.setdefault("model", {})  # grid_size stays the detection config's (8 cm), for both arms
        if arm.checkpoint is not None:
            model["init"] = str(arm.checkpoint)
        else:
            backbone = dataclasses.asdict(dataclasses.replace(source.backbone, num_classes=0))
            model.update(init=None, backbone=_plain(backbone), conditions=list(source.conditions),
                         input_features=list(source.input_features))
        cfg.setdefault("eval", {})["after_train"] = True
        train = cfg.setdefault("train", {})
        if args.quick:
            train.update(epochs=1, steps_per_epoch=3)
        else:  # the 100 % run's steps per epoch for every share; epochs cover --detect-steps
            per_epoch = max(1, math.ceil(_num_train_scenes(data, cfg) / train.get("batch_size", 2)))
            total = args.detect_steps or per_epoch * train.get("epochs", 1)
            train.update(steps_per_epoch=per_epoch, epochs=max(1, math.ceil(total / per_epoch)))
        out.mkdir(parents=True, exist_ok=True)
        (out / "experiment.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        parser = argparse.ArgumentParser(prog="ponder train detect")
        add_train_arguments(parser)
        train_args = parser.parse_args(["--config", str(out / "experiment.yaml"), "--out", str(out), "--resume"])
        with open(out / "train.log", "a") as log_file, contextlib.redirect_stdout(log_file):  # its tables go there
            try:
                code = run_train(train_args)
            except (ValueError, FileNotFoundError, PermissionError, IsADirectoryError) as exc:  # ponder's exit 2
                print(f"ponder train detect: error: {exc}", file=sys.stderr)
                code = 2
        if code != 0 or not done.is_file():
            log.warning("detection run %s gave no metrics (exit code %d)", out, code)
            return {}
    return _metrics(done, "detection")


def _metrics(path: Path, task: str) -> dict[str, float]:
    """The task's table metrics from a run's metrics.json (non-finite or missing ones left out)."""
    saved = json.loads(path.read_text())
    return {m: float(saved[m]) for m in METRICS[task]
            if isinstance(saved.get(m), (int, float)) and math.isfinite(saved[m])}


def _num_train_scenes(data: Path, cfg: dict) -> int:
    from training.detect.dataset import find_scene_dirs

    return len(find_scene_dirs(data, cfg.get("data", {}).get("train_split", "train")))


def format_table(results: Results, arms: list[str], fractions: list[float], notes: dict[str, str]) -> str:
    rows = [(task, metric) for task, metrics in METRICS.items() for metric in metrics]
    width = max(11, *(len(a) for a in arms))
    head = f"{'task':<13} {'metric':<9} {'init':<{width}}" + "".join(f" {_pct(f) + ' labels':>12}" for f in fractions)
    lines = [head, "-" * len(head)]
    for task, metric in rows:
        for arm in arms:
            cells = []
            for f in fractions:
                value = results.get((task, metric, arm, f))
                cells.append(f" {'n/a' if value is None else f'{100 * value:.1f}':>12}")
            lines.append(f"{task:<13} {metric:<9} {arm:<{width}}" + "".join(cells))
    lines += [f"note: {text}" for text in notes.values()]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrained", nargs="+", required=True, metavar="[LABEL=]CKPT",
                   help="rendering-pre-trained checkpoint (folder or .pth); several as LABEL=CKPT compare them")
    p.add_argument("--random", action=argparse.BooleanOptionalAction, default=True,
                   help="also fine-tune from random initialisation (--no-random: only the checkpoints, e.g. to add "
                        "one to an experiment folder whose random runs exist or run elsewhere)")
    p.add_argument("--out", type=Path, default=Path("runs/data-efficiency"), help="experiment folder")
    p.add_argument("--data", type=Path, default=None, help="existing data root with train/ and val/ scenes")
    p.add_argument("--scenes", type=int, default=16, help="scenes to generate without --data (default 16: 12/4)")
    p.add_argument("--data-seed", type=int, default=1, help="dataset seed; must differ from the pre-training data's")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.05, 1.0], help="label fractions")
    p.add_argument("--tasks", nargs="+", choices=("segment", "detect"), default=["segment", "detect"])
    p.add_argument("--segment-config", type=Path, default=CONFIGS / "segment-small-cpu.yaml")
    p.add_argument("--detect-config", type=Path, default=CONFIGS / "detect-small-cpu.yaml")
    p.add_argument("--detect-steps", type=int, default=None,
                   help="training steps of every detection run (default: the config's epochs over all train scenes)")
    p.add_argument("--precise", action="store_true", help="score segmentation with the 13-view precise protocol")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is fastest on busy machines)")
    p.add_argument("--quick", action="store_true",
                   help="smoke version: 4 scenes, 3 steps per run, one validation scene")
    args = p.parse_args(argv)
    if args.quick and args.data is None:
        args.scenes = 4
    if any(not 0 < f <= 1 for f in args.fractions):
        p.error(f"--fractions must lie in (0, 1], got {args.fractions}")
    if args.detect_steps is not None and args.detect_steps < 1:
        p.error(f"--detect-steps must be positive, got {args.detect_steps}")
    if args.scenes < 2:
        p.error("--scenes must be at least 2 (train and val)")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    from model.checkpoint import CheckpointError
    from training.config_io import ConfigError

    try:
        return run_experiment(args)
    except (FileNotFoundError, CheckpointError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def run_experiment(args: argparse.Namespace) -> int:
    import torch

    from training.segment.task import read_pretrained

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        arms = parse_arms(args.pretrained, args.random)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    sources = {arm.name: read_pretrained(arm.checkpoint).config for arm in arms if arm.checkpoint is not None}
    source = next(iter(sources.values()))  # the random arm's architecture
    differing = [name for name, cfg in sources.items() if _architecture(cfg) != _architecture(source)]
    if differing:
        print(f"error: {', '.join(differing)}: another backbone or input than {arms[0].name}; the arms must share "
              "one architecture", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    data = prepare_data(args)
    notes: dict[str, str] = {"labels": "segmentation keeps that share of each scene's labelled points; "
                                       "detection trains on that share of the scenes (at least one)"}
    if args.quick:
        notes["quick"] = "--quick: 3 training steps per run, one validation scene; figures are a smoke test only"
    runners = {"segment": ("segmentation", run_segmentation), "detect": ("detection", run_detection)}
    for name, (task, _) in runners.items():
        if name not in args.tasks:
            notes[name] = f"{task}: not run (--tasks)"
    results: Results = {}
    for fraction in args.fractions:
        for arm in arms:
            for name, (task, run) in runners.items():
                if name in args.tasks:
                    for metric, value in run(args, arm, fraction, data, source).items():
                        results[(task, metric, arm.name, fraction)] = value
    table = format_table(results, [a.name for a in arms], args.fractions, notes)
    header = (f"data-efficient fine-tuning from {', '.join(args.pretrained)} vs random init; data {data} "
              f"({len((data / 'train.txt').read_text().split()) if (data / 'train.txt').is_file() else '?'} train "
              f"scenes); values in %")
    print(header + "\n" + table)
    (args.out / "results.json").write_text(json.dumps(
        [{"task": t, "metric": m, "init": a, "fraction": f, "value": v} for (t, m, a, f), v in results.items()],
        indent=2))
    (args.out / "results.txt").write_text(header + "\n" + table + "\n")
    return 0


def _pct(fraction: float) -> str:
    return f"{100 * fraction:g}%"


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


if __name__ == "__main__":
    sys.exit(main())

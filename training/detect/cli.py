"""3D object detection: fine-tune an encoder with a voting box head and evaluate it (running a trained
detector, ``ponder detect``, is `ponder.detect_commands`).

    ponder train detect --config CFG [--init CKPT] [--out DIR] [--label-fraction F] [--resume] [--device D]
    ponder evaluate detect --data DIR --checkpoint CKPT [--split val] [--json FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
from pathlib import Path

from model.devices import torch_device
from training.cli_common import apply_overrides, check_json_output, fit_and_report, open_run, write_json

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ train


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, required=True, help="detection YAML (training/configs/detect-*.yaml)")
    parser.add_argument("--init", default=None,
                        help="checkpoint whose encoder starts the run (ours, an official .pth, or a pre-training "
                             "checkpoint); default: the config's model.init")
    parser.add_argument("--out", type=Path, default=None, help="run folder (default: the config's out_dir)")
    parser.add_argument("--label-fraction", type=float, default=None,
                        help="train on this share of the training scenes (0 < F <= 1; data-efficient runs)")
    parser.add_argument("--data", default=None, help="data root (default: the config's data.root)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: the config's train.device")


def ensure_data(cfg, given_root: bool = False) -> None:
    """Generate the synthetic scenes a config asks for when its data folder does not exist yet. A folder given
    with ``--data`` (``given_root``) is used with however many scenes it holds; an incomplete one is refused."""
    from training.data.synthetic import SceneConfig, generate_dataset
    from training.data.synthetic.dataset import needs_generation

    root, gen = Path(cfg.data.root), cfg.data.generate
    if gen is None or not needs_generation(root, 0 if given_root else gen.scenes):  # refuses an incomplete one
        return
    log.info("generating %d synthetic scenes into %s", gen.scenes, root)
    splits = [(cfg.data.train_split, 1.0 - gen.val_fraction)]
    if cfg.data.val_split and gen.val_fraction > 0:
        splits.append((cfg.data.val_split, gen.val_fraction))
    generate_dataset(root, gen.scenes, gen.seed, SceneConfig(num_frames=0, points_per_m2=gen.points_per_m2),
                     splits=tuple(splits), progress=True)


def run_train(args: argparse.Namespace) -> int:
    from model.checkpoint import save_checkpoint
    from training.detect.config import load_config
    from training.detect.task import DetectorTrainer, DetectTask, build_detector

    cfg = load_config(args.config)
    if args.label_fraction is not None and not 0 < args.label_fraction <= 1:
        raise ValueError(f"--label-fraction must lie in (0, 1], got {args.label_fraction}")
    apply_overrides(args, cfg, {"label_fraction": "data.label_fraction", "data": "data.root", "init": "model.init",
                                "device": "train.device"})
    run = open_run(args, cfg)
    ensure_data(cfg, given_root=args.data is not None)
    model, model_cfg = build_detector(cfg)
    task = DetectTask(cfg, model_cfg)
    _report_label_fraction(cfg, task.num_samples())
    condition = cfg.model.condition or model_cfg.default_condition()
    trainer_model = DetectorTrainer(model, cfg.loss, condition, cfg.model.freeze_backbone)
    effective = json.loads(json.dumps(dataclasses.asdict(cfg)))  # after --init/--data/--label-fraction
    fit_and_report(run, trainer_model, task, cfg.train, lambda m, d: save_checkpoint(m, model_cfg, d),
                   resume=args.resume, document=effective, samples="scenes", metric=None, container="official",
                   model_config=model_cfg.to_dict())
    if cfg.eval.after_train and cfg.data.val_split and int(os.environ.get("RANK", 0)) == 0:
        from training.detect.dataset import find_scene_dirs

        try:
            val_dirs = find_scene_dirs(cfg.data.root, cfg.data.val_split)
        except FileNotFoundError as exc:
            log.warning("no validation scenes (%s); skipping the evaluation", exc)
            return 0
        metrics = _evaluate(run.out / "final", val_dirs, condition, cfg.eval, cfg.train.device)
        print(f"validation ({cfg.data.val_split}, {len(val_dirs)} scenes):\n{metrics.table()}")
        write_json(run.out / "metrics.json", metrics.summary())
    return 0


def _report_label_fraction(cfg, kept: int) -> None:
    """Say how many training scenes a label fraction leaves: at least one is always kept, so a tiny fraction
    trains on more scenes than asked, and the user should know it is one scene, not none."""
    if cfg.data.label_fraction >= 1:
        return
    from training.detect.dataset import find_scene_dirs

    total = len(find_scene_dirs(cfg.data.root, cfg.data.train_split))
    total = min(total, cfg.data.max_scenes) if cfg.data.max_scenes is not None else total
    level = logging.WARNING if cfg.data.label_fraction * total < 1 else logging.INFO
    log.log(level, "label fraction %g keeps %d of %d training scenes%s", cfg.data.label_fraction, kept, total,
            " (at least one is always kept)" if level == logging.WARNING else "")


def _evaluate(checkpoint: Path, scene_dirs, condition, eval_cfg, device: str, trust: bool = False):
    from model.inference import load_predictor
    from training.detect.evaluate import evaluate_detector

    predictor = load_predictor(checkpoint, device=device, trust_checkpoint=trust)
    return evaluate_detector(predictor, scene_dirs, condition, eval_cfg.score_threshold, eval_cfg.iou_thresholds,
                             eval_cfg.report_score)


# ------------------------------------------------------------------------------------------ evaluate


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, required=True,
                        help="data root with <split>/ scene folders, a folder of scenes, or one scene folder "
                             "(each with boxes.npy and box_labels.npy)")
    parser.add_argument("--checkpoint", type=Path, required=True, help="detection checkpoint (folder)")
    parser.add_argument("--split", default="val", help="split under --data (default val)")
    parser.add_argument("--score", type=float, default=0.05,
                        help="lowest score kept for AP (default 0.05: AP sees nearly the whole ranking)")
    parser.add_argument("--report-score", type=float, default=0.3,
                        help="recall is also reported for boxes scoring at least this (default 0.3)")
    parser.add_argument("--iou", type=float, nargs="+", default=[0.25, 0.5], help="IoU thresholds (default 0.25 0.5)")
    parser.add_argument("--condition", default=None, help="dataset condition of PDNorm/PPT encoders")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--json", type=Path, default=None, help="also write the metrics to this JSON file")
    parser.add_argument("--trust-checkpoint", action="store_true", help="allow full unpickling of an official .pth")


def run_evaluate(args: argparse.Namespace) -> int:
    from training.detect.config import EvalConfig
    from training.detect.dataset import find_scene_dirs

    for value in (args.score, args.report_score):
        if not 0 <= value <= 1:
            raise ValueError(f"--score and --report-score must lie in [0, 1], got {value}")
    for value in args.iou:
        if not 0 < value < 1:  # as the config's eval.iou_thresholds: 0 matches anything, 1 nothing
            raise ValueError(f"--iou thresholds must lie in (0, 1), got {value}")
    check_json_output(args.json)
    torch_device(args.device)
    if not args.checkpoint.exists():
        raise FileNotFoundError(f"{args.checkpoint}: no such checkpoint")
    dirs = find_scene_dirs(args.data, args.split)
    eval_cfg = EvalConfig(score_threshold=args.score, report_score=args.report_score, iou_thresholds=tuple(args.iou))
    metrics = _evaluate(args.checkpoint, dirs, args.condition, eval_cfg, args.device, args.trust_checkpoint)
    print(f"{len(dirs)} scenes from {args.data}")
    print(metrics.table())
    if args.json:
        write_json(args.json, metrics.summary())
    return 0

"""Image pre-training and evaluation commands (wired under ``ponder images`` by ponder/image_commands.py).

    ponder images train --config CFG [--out DIR] [--resume] [--device cpu|cuda] [--image-weights FILE]
    ponder images evaluate --config CFG [--checkpoint DIR] [--untrained] [--json OUT]
    ponder images train-segment --config CFG [--out DIR] [--init IMAGE_MODEL] [--resume]
    ponder images evaluate-segment --config CFG [--checkpoint DIR] [--point-checkpoint CKPT] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from training.cli_common import PSNR, Metric, check_json_output, run_training, set_threads, write_json


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, required=True, help="training/configs/pretrain-images-*.yaml")
    parser.add_argument("--out", type=Path, default=None, help="run folder (default: the config's out_dir)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: the config's train.device")
    parser.add_argument("--image-weights", type=Path, default=None,
                        help="local torchvision-layout ResNet state_dict for the 2D backbone (nothing is downloaded)")


def run_train(args: argparse.Namespace) -> int:
    from model.images.checkpoint import save_image_model
    from training.images.config import load_config
    from training.images.task import ImagePretrainTask, build_image_model
    from training.pretrain.cli import ensure_data

    run_training(args, load_config(args.config), overrides={"device": "train.device", "image_weights": "image_weights"},
                 ensure_data=ensure_data, make_task=ImagePretrainTask, build_model=build_image_model,
                 save_fn=save_image_model, samples="scenes", metric=PSNR, container="resume")
    return 0


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, required=True, help="the image pre-training YAML (data, eval)")
    parser.add_argument("--checkpoint", type=Path, default=None, help="default: <out_dir>/final of the config")
    parser.add_argument("--untrained", action="store_true",
                        help="score the config's model with its initial weights (train.seed) instead: the baseline")
    parser.add_argument("--point-checkpoint", type=Path, default=None,
                        help="also score this point-cloud pre-training checkpoint on the same held-out views "
                             "(rendered from the scene's point cloud instead of the input images)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--json", type=Path, default=None, help="also write the scores to this file")


def run_evaluate(args: argparse.Namespace) -> int:
    from model.images.checkpoint import load_image_model
    from training.images.config import load_config
    from training.images.evaluate import evaluate_image_views
    from training.images.task import build_image_model

    cfg = load_config(args.config)
    check_json_output(args.json)
    set_threads(cfg)
    if args.untrained:
        model = build_image_model(cfg).to(args.device).eval()
    else:
        model = load_image_model(args.checkpoint or Path(cfg.out_dir) / "final", args.device)
    summary = evaluate_image_views(model, cfg.data, cfg.eval).summary()
    print(json.dumps({k: v for k, v in summary.items() if k != "per_view"}))
    if args.point_checkpoint:
        summary = {"images": summary, "point_cloud": _point_scores(args.point_checkpoint, cfg, args.device)}
        print(json.dumps({"point_cloud": {k: v for k, v in summary["point_cloud"].items() if k != "per_view"}}))
    if args.json:
        write_json(args.json, summary)
    return 0


def _point_scores(checkpoint: Path, cfg, device: str) -> dict:
    """The point-cloud model's scores on the image evaluation's target views (same scenes, same frames)."""
    from model.checkpoint import load_checkpoint
    from training.pretrain.config import EvalConfig
    from training.pretrain.evaluate import evaluate_views

    loaded = load_checkpoint(checkpoint)
    loaded.model.to(device)
    e = cfg.eval
    scores = evaluate_views(loaded.model, loaded.config, cfg.data.scene_data(),
                            EvalConfig(split=e.split, frames=e.frames, scenes=e.scenes, views=e.views, chunk=e.chunk))
    return scores.summary()


def add_segment_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, required=True, help="training/configs/segment-images-*.yaml")
    parser.add_argument("--out", type=Path, default=None, help="run folder (default: the config's out_dir)")
    parser.add_argument("--init", type=Path, default=None,
                        help="pre-trained image model folder whose trunk starts the segmenter (default: the "
                             "config's init, else fresh weights)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: the config's train.device")


def run_segment_train(args: argparse.Namespace) -> int:
    """``ponder images train-segment``: fine-tune a per-voxel segmentation head on the lifted volume."""
    from model.images.checkpoint import save_image_model
    from training.images.segment import ImageSegmentTask, build_segmenter, ensure_segment_data, load_segment_config

    run_training(args, load_segment_config(args.config), overrides={"device": "train.device", "init": "init"},
                 ensure_data=ensure_segment_data, make_task=ImageSegmentTask, build_model=build_segmenter,
                 save_fn=save_image_model, samples="rooms", metric=Metric("voxel accuracy", "voxel_acc", 3),
                 container="resume")
    return 0


def add_segment_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, required=True, help="the image segmentation YAML (data, eval)")
    parser.add_argument("--checkpoint", type=Path, default=None, help="default: <out_dir>/final of the config")
    parser.add_argument("--point-checkpoint", type=Path, default=None,
                        help="also score this point-cloud segmentation model on the same rooms and points")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--json", type=Path, default=None, help="also write the scores to this file")


def run_segment_evaluate(args: argparse.Namespace) -> int:
    """``ponder images evaluate-segment``: per-point mIoU on the held-out rooms (all points, seen points)."""
    from model.images.segment import load_image_segment_model
    from training.images.segment import ensure_segment_data, evaluate_image_segment, load_segment_config

    cfg = load_segment_config(args.config)
    check_json_output(args.json)
    set_threads(cfg)
    ensure_segment_data(cfg)
    model = load_image_segment_model(args.checkpoint or Path(cfg.out_dir) / "final", args.device)
    scores = evaluate_image_segment(model, cfg, args.point_checkpoint)
    print(json.dumps(scores))
    if args.json:
        write_json(args.json, scores)
    return 0

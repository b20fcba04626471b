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

from model.devices import torch_device


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, required=True, help="training/configs/pretrain-images-*.yaml")
    parser.add_argument("--out", type=Path, default=None, help="run folder (default: the config's out_dir)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: the config's train.device")
    parser.add_argument("--image-weights", type=Path, default=None,
                        help="local torchvision-layout ResNet state_dict for the 2D backbone (nothing is downloaded)")


def run_train(args: argparse.Namespace) -> int:
    import torch
    import yaml

    from model.images.checkpoint import save_image_model
    from training.engine import Trainer
    from training.images.config import load_config
    from training.images.task import ImagePretrainTask, build_image_model
    from training.pretrain.cli import ensure_data

    cfg = load_config(args.config)
    if args.device:
        cfg.train.device = args.device
    if args.image_weights:
        cfg.image_weights = str(args.image_weights)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch_device(cfg.train.device)  # a clear error for CUDA without a GPU
    out = Path(args.out or cfg.out_dir)
    last = out / "model" / "model_last.pth"
    if last.exists() and not args.resume:
        raise ValueError(f"{out} already holds a run ({last}); pass --resume to continue it or choose another --out")
    ensure_data(cfg)
    task = ImagePretrainTask(cfg)
    model = build_image_model(cfg)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(yaml.safe_load(Path(args.config).read_text()), sort_keys=False))
    trainer = Trainer(model, task, cfg.train, out, save_fn=save_image_model)
    history = trainer.fit(resume=args.resume)
    if trainer.rank == 0 and history:
        first, final = history[0], history[-1]
        print(f"trained {trainer.step} steps on {task.num_samples()} scenes: loss {first['loss']:.4f} -> "
              f"{final['loss']:.4f}, psnr {first.get('psnr', float('nan')):.2f} -> "
              f"{final.get('psnr', float('nan')):.2f} dB")
    print(f"checkpoint: {out / 'final'} (resume container: {last})")
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
    import torch

    from model.images.checkpoint import load_image_model
    from training.images.config import load_config
    from training.images.evaluate import evaluate_image_views
    from training.images.task import build_image_model

    cfg = load_config(args.config)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
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
        args.json.write_text(json.dumps(summary, indent=2))
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
    import torch
    import yaml

    from model.images.checkpoint import save_image_model
    from training.engine import Trainer
    from training.images.segment import ImageSegmentTask, build_segmenter, ensure_segment_data, load_segment_config

    cfg = load_segment_config(args.config)
    if args.device:
        cfg.train.device = args.device
    if args.init:
        cfg.init = str(args.init)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch_device(cfg.train.device)  # a clear error for CUDA without a GPU
    out = Path(args.out or cfg.out_dir)
    last = out / "model" / "model_last.pth"
    if last.exists() and not args.resume:
        raise ValueError(f"{out} already holds a run ({last}); pass --resume to continue it or choose another --out")
    ensure_segment_data(cfg)
    task = ImageSegmentTask(cfg)
    model = build_segmenter(cfg)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(yaml.safe_load(Path(args.config).read_text()), sort_keys=False))
    trainer = Trainer(model, task, cfg.train, out, save_fn=save_image_model)
    history = trainer.fit(resume=args.resume)
    if trainer.rank == 0 and history:
        first, final = history[0], history[-1]
        print(f"trained {trainer.step} steps on {task.num_samples()} rooms: loss {first['loss']:.4f} -> "
              f"{final['loss']:.4f}, voxel accuracy {first.get('voxel_acc', float('nan')):.3f} -> "
              f"{final.get('voxel_acc', float('nan')):.3f}")
    print(f"checkpoint: {out / 'final'} (resume container: {last})")
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
    import torch

    from model.images.segment import load_image_segment_model
    from training.images.segment import ensure_segment_data, evaluate_image_segment, load_segment_config

    cfg = load_segment_config(args.config)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    ensure_segment_data(cfg)
    model = load_image_segment_model(args.checkpoint or Path(cfg.out_dir) / "final", args.device)
    scores = evaluate_image_segment(model, cfg, args.point_checkpoint)
    print(json.dumps(scores))
    if args.json:
        args.json.write_text(json.dumps(scores, indent=2))
    return 0

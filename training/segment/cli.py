"""Semantic-segmentation fine-tuning (CE + Lovász, official PPT / SpUNet recipes) and its evaluation.

    ponder train segment --config CFG [--init CKPT] [--out DIR] [--data DIR] [--label-fraction F]
                         [--label-mode points|scenes] [--epochs N] [--resume] [--device cpu|cuda]
    ponder evaluate segment --data DIR --checkpoint CKPT [--split val] [--precise] [--condition C]
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from model.devices import torch_device
from model.arguments import positive_int
from training.cli_common import apply_overrides, check_json_output, checkpoint_line, open_run, write_json

log = logging.getLogger(__name__)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, required=True, help="fine-tune YAML (training/configs/segment-*.yaml)")
    parser.add_argument("--init", default=None,
                        help="pre-trained checkpoint (our folder or an official .pth, any kind); 'none': random init")
    parser.add_argument("--out", type=Path, default=None, help="run folder (default: the config's out_dir)")
    parser.add_argument("--data", default=None, help="data root (default: the config's data.root)")
    parser.add_argument("--label-fraction", type=float, default=None,
                        help="keep this fraction of the labels (data-efficient setting), in (0, 1]")
    parser.add_argument("--label-mode", choices=("points", "scenes"), default=None,
                        help="what --label-fraction selects: points of every scene, or whole scenes")
    parser.add_argument("--epochs", type=positive_int, default=None, help="override train.epochs")
    parser.add_argument("--evaluate", choices=("fast", "precise", "none"), default=None,
                        help="evaluation after training (default: the config's evaluate.mode)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: the config's train.device")
    parser.add_argument("--trust-checkpoint", action="store_true", help="allow full unpickling of an official .pth")


def run_train(args: argparse.Namespace) -> int:
    from training.segment.config import config_to_dict, load_config
    from training.segment.task import fine_tune

    cfg = load_config(args.config)
    if args.init is not None:
        cfg.init.checkpoint = None if args.init.lower() == "none" else args.init
    apply_overrides(args, cfg, {"data": "data.root", "label_fraction": "data.label_fraction",
                                "label_mode": "data.label_mode", "epochs": "train.epochs",
                                "evaluate": "evaluate.mode", "device": "train.device"})
    if args.trust_checkpoint:
        cfg.init.trust = True
    cfg.validate()
    run = open_run(args, cfg)
    # config.yaml only once the data and the resume checks have passed: a failed start leaves the run as it was
    result = fine_tune(cfg, run.out, resume=args.resume, before_training=lambda: run.write_config(config_to_dict(cfg)))
    if result.init is not None:
        print(result.init.summary())
    if result.history:
        first, final = result.history[0], result.history[-1]
        print(f"trained {len(result.history)} steps: loss {first['loss']:.4f} -> {final['loss']:.4f} "
              f"(ce {final.get('ce', float('nan')):.4f}, lovasz {final.get('lovasz', float('nan')):.4f})")
    if result.metrics is not None:
        print(f"{cfg.evaluate.mode} evaluation on {cfg.evaluate.split or cfg.data.val_split}:")
        print(result.metrics.table())
        scores = {"mode": cfg.evaluate.mode, **result.metrics.as_dict()}
        write_json(run.out / "metrics.json", scores)
    print(checkpoint_line(result.checkpoint, run.last, "official"))
    return 0


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, required=True, help="data root holding <split>/<scene> point scenes")
    parser.add_argument("--checkpoint", type=Path, required=True, help="segmentation checkpoint (folder or .pth)")
    parser.add_argument("--split", default="val", help="split folder to score (default val)")
    parser.add_argument("--precise", action="store_true",
                        help="official test protocol: 13 test-time augmentations x fragments, voting")
    parser.add_argument("--condition", default=None, help="dataset condition (default: the model's)")
    parser.add_argument("--max-scenes", type=int, default=None, help="score only the first N scenes")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--json", type=Path, default=None, help="also write the scores to this file")
    parser.add_argument("--trust-checkpoint", action="store_true", help="allow full unpickling of an official .pth")


def run_evaluate(args: argparse.Namespace) -> int:
    from training.segment.evaluate import evaluate_checkpoint

    torch_device(args.device)
    if args.max_scenes is not None and args.max_scenes < 1:
        raise ValueError(f"--max-scenes must be at least 1, got {args.max_scenes}")
    check_json_output(args.json)
    metrics = evaluate_checkpoint(args.checkpoint, args.data, args.split, args.precise, args.condition,
                                  args.device, args.max_scenes, args.trust_checkpoint, progress=True)
    mode = "precise" if args.precise else "fast"
    print(f"{mode} evaluation of {args.checkpoint} on {args.data}/{args.split}:")
    print(metrics.table())
    if args.json is not None:
        write_json(args.json, {"mode": mode, **metrics.as_dict()})
    return 0

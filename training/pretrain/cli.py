"""Rendering pre-training (PonderIndoor-v2) on RGB-D scenes (novel views of a trained model, ``ponder render``,
are `ponder.render_commands`).

    ponder train pretrain --config CFG [--out DIR] [--resume] [--device cpu|cuda]
    ponder evaluate pretrain --config CFG [--checkpoint CKPT] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

from model.devices import torch_device
from training.cli_common import PSNR, check_json_output, run_training, write_json


log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ train


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, required=True,
                        help="pre-training YAML (training/configs/pretrain-*.yaml)")
    parser.add_argument("--out", type=Path, default=None, help="run folder (default: the config's out_dir)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: the config's train.device")


def ensure_data(cfg) -> None:
    """Generate the synthetic scenes a config asks for when its data folder does not exist yet. Under torchrun
    rank 0 writes them while the other ranks wait at a barrier."""
    import torch.distributed as dist

    from training.data.synthetic import SceneConfig, generate_dataset
    from training.data.synthetic.dataset import needs_generation
    from training.engine import join_process_group

    root, gen = Path(cfg.data.root), cfg.data.generate
    if gen is None:
        return
    world = int(os.environ.get("WORLD_SIZE", 1))
    join_process_group(cfg.train.device)  # under torchrun; the engine reuses this process group
    missing = needs_generation(root, gen.scenes)  # every rank: an incomplete folder fails all of them, none waits
    if int(os.environ.get("RANK", 0)) == 0 and missing:
        log.info("generating %d synthetic scenes into %s", gen.scenes, root)
        scene_cfg = SceneConfig(num_frames=gen.frames, image_downscale=gen.image_downscale,
                                points_per_m2=gen.points_per_m2, room_x=tuple(gen.room_x), room_y=tuple(gen.room_y))
        generate_dataset(root, gen.scenes, gen.seed, scene_cfg, splits=((cfg.data.split, 1.0),), progress=True)
    if world > 1:
        dist.barrier()


def run_train(args: argparse.Namespace) -> int:
    from model.checkpoint import save_checkpoint
    from training.pretrain.config import load_config
    from training.pretrain.task import PretrainTask, build_pretrain_model

    cfg = load_config(args.config)
    run_training(args, cfg, overrides={"device": "train.device"}, ensure_data=ensure_data, make_task=PretrainTask,
                 build_model=build_pretrain_model, save_fn=lambda m, d: save_checkpoint(m, cfg.model, d),
                 samples="scenes", metric=PSNR, container="official", model_config=lambda c: c.model.to_dict())
    return 0


# ------------------------------------------------------------------------------------------ evaluate


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, required=True, help="the pre-training YAML (data and eval sections)")
    parser.add_argument("--checkpoint", type=Path, default=None, help="default: <out_dir>/final of the config")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--json", type=Path, default=None, help="also write the scores to this file")


def run_evaluate(args: argparse.Namespace) -> int:
    from model.checkpoint import load_checkpoint
    from training.pretrain.config import load_config
    from training.pretrain.evaluate import evaluate_views

    cfg = load_config(args.config)
    check_json_output(args.json)
    device = torch_device(args.device)
    checkpoint = args.checkpoint or Path(cfg.out_dir) / "final"
    # an official .pth stores weights only: the render geometry (grid, samples, rays) is the config's, not
    # the defaults that inferring it from the weights would give
    official = not checkpoint.is_dir() and checkpoint.suffix != ".safetensors"
    loaded = load_checkpoint(checkpoint, config=cfg.model if official else None)
    loaded.model.to(device)
    result = evaluate_views(loaded.model, loaded.config, cfg.data, cfg.eval)
    summary = result.summary()
    print(json.dumps({k: v for k, v in summary.items() if k != "per_view"}))
    if args.json:
        write_json(args.json, summary)
    return 0

"""``ponder render``: novel views (colour and depth) of a point cloud with a pre-training checkpoint.

    ponder render INPUT --checkpoint CKPT --cameras CAMS.json -o OUT_DIR [--chunk N] [--condition C] [--device D]

It runs a trained model, so it lives in the composition root, not in training (``ponder train pretrain`` /
``ponder evaluate pretrain`` stay in `training.pretrain.cli`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from model.pointcloud.gravity import UP_AXES


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("render", help="render novel views (colour and depth) of a point cloud with a "
                              "pre-training checkpoint")
    p.add_argument("input", type=Path, help="point cloud (PLY, LAS/LAZ, PCD, NPY, ...)")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="checkpoint with a render decoder (folder or official .pth; default: the bundled model)")
    p.add_argument("--cameras", type=Path, required=True,
                   help="cameras JSON (see model/render/cameras.py) or a nerfstudio transforms.json")
    p.add_argument("-o", "--out", type=Path, required=True, help="output folder (created)")
    p.add_argument("--chunk", type=int, default=4096, help="rays rendered at a time; bounds memory (default 4096)")
    p.add_argument("--condition", default=None, help="dataset condition (default: the model's)")
    p.add_argument("--up", default="z", choices=UP_AXES,
                   help="the input's up axis (the model expects z-up metres; auto = estimate gravity); cameras stay "
                        "in the input's frame. Default z")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--trust-checkpoint", action="store_true", help="allow full unpickling of an official .pth")
    p.set_defaults(handler=run_render)


def run_render(args: argparse.Namespace) -> int:
    from model.checkpoint import load_checkpoint
    from model.devices import torch_device
    from model.inference import default_checkpoint
    from model.novel_view import render_scene
    from model.pointcloud.readers import read_point_cloud
    from model.prepare import InputOptions
    from model.render.cameras import read_cameras
    from model.render.images import ViewImages

    if args.chunk < 1:
        raise ValueError(f"--chunk must be positive, got {args.chunk}")
    cameras = read_cameras(args.cameras)
    loaded = load_checkpoint(args.checkpoint or default_checkpoint("render"), trust=args.trust_checkpoint)
    cloud = read_point_cloud(args.input)
    views = render_scene(loaded, cloud, cameras, args.condition, args.chunk, torch_device(args.device),
                         options=InputOptions(up=args.up, invalid="error"))
    args.out.mkdir(parents=True, exist_ok=True)
    for i, view in enumerate(views):
        images = ViewImages.of(view)
        images.write(args.out, i)
        print(f"{i}: {view.rgb.shape[1]}x{view.rgb.shape[0]}, {images.hit_fraction:.0%} of rays hit the scene box")
    print(f"wrote {len(views)} views to {args.out}")
    return 0

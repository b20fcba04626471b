"""``ponder render``: novel views (colour and depth) of a point cloud with a pre-training checkpoint.

    ponder render INPUT --checkpoint CKPT --cameras CAMS.json -o OUT_DIR [--chunk N] [--condition C] [--device D]
                  [--max-pixels N] [--strict]

It runs a trained model, so it lives in the composition root, not in training (``ponder train pretrain`` /
``ponder evaluate pretrain`` stay in `training.pretrain.cli`). Every input check (output folder, cameras and
their pixel count, the cloud) runs before the model is loaded.
"""

from __future__ import annotations

import argparse
import sys
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
    p.add_argument("--max-pixels", type=int, default=None,
                   help="refuse cameras whose images add up to more pixels (default: the service's "
                        "PONDER_MAX_RENDER_PIXELS default, 4194304); every view is held in memory until written")
    p.add_argument("--strict", action="store_true",
                   help="refuse a cloud with NaN/inf points (exit 2) instead of dropping them with a warning")
    p.set_defaults(handler=run_render)


def default_max_pixels() -> int:
    """The service's default render pixel limit (``ServiceSettings.max_render_pixels``): one limit for both."""
    from service.settings import ServiceSettings

    return int(ServiceSettings.model_fields["max_render_pixels"].default)


def check_out_folder(out: Path) -> None:
    """Refuse, before any work, an output path that is (or lies under) something other than a folder."""
    for path in (out, *out.parents):
        if path.exists() and not path.is_dir():
            raise ValueError(f"{out}: {'it' if path == out else path} exists and is not a folder; -o takes an "
                                 "output folder (created if missing)")


def check_pixels(cameras, max_pixels: int) -> None:
    """The service's pixel limit (PONDER_MAX_RENDER_PIXELS) for the views of one run, before any allocation."""
    pixels = sum(int(c.width) * int(c.height) for c in cameras)
    if pixels > max_pixels:
        raise ValueError(f"{len(cameras)} camera(s) with {pixels} pixels in all exceed the limit of {max_pixels} "
                         "(the service's PONDER_MAX_RENDER_PIXELS); render fewer or smaller views, or raise the "
                         "limit with --max-pixels")


class ViewWriter:
    """Writes each rendered view into ``folder`` as it is done, with a progress bar over the views, so a long
    run shows where it is and an interrupted one keeps the views it finished (``on_view`` of the renderers)."""

    def __init__(self, folder: Path, count: int, progress: bool = True) -> None:
        from tqdm import tqdm

        self.folder, self.written = folder, 0
        self.bar = tqdm(total=count, unit="view", disable=not progress, file=sys.stderr, dynamic_ncols=True)

    def __call__(self, index: int, view) -> None:
        from model.render.images import ViewImages

        images = ViewImages.of(view)
        self.folder.mkdir(parents=True, exist_ok=True)
        images.write(self.folder, index)
        self.written += 1
        self.bar.write(f"{index}: {images.color.shape[1]}x{images.color.shape[0]}, "
                       f"{images.hit_fraction:.0%} of rays hit the scene box", file=sys.stdout)
        self.bar.update(1)

    def __enter__(self) -> "ViewWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()
        if exc[0] is not None and self.written:
            print(f"kept the {self.written} view(s) written to {self.folder}", file=sys.stderr)


def run_render(args: argparse.Namespace) -> int:
    import warnings

    from model.checkpoint import load_checkpoint
    from model.devices import torch_device
    from model.inference import default_checkpoint
    from model.novel_view import render_scene
    from model.pointcloud.readers import read_point_cloud
    from model.prepare import InputOptions, InvalidPointsWarning, invalid_rows
    from model.render.cameras import read_cameras

    if args.chunk < 1:
        raise ValueError(f"--chunk must be positive, got {args.chunk}")
    max_pixels = default_max_pixels() if args.max_pixels is None else args.max_pixels
    if max_pixels < 1:
        raise ValueError(f"--max-pixels must be positive, got {max_pixels}")
    check_out_folder(args.out)
    cameras = read_cameras(args.cameras)
    check_pixels(cameras, max_pixels)
    cloud = read_point_cloud(args.input, keep_invalid=not args.strict)  # read first: bad input fails before the model
    dropped = 0 if args.strict else int(invalid_rows(cloud).sum())
    if dropped and dropped < len(cloud):
        print(f"warning: dropped {dropped:,} of {len(cloud):,} points with NaN or infinite coordinates or normals "
              "(--strict refuses them)", file=sys.stderr)
    loaded = load_checkpoint(args.checkpoint or default_checkpoint("render"), trust=args.trust_checkpoint)
    with warnings.catch_warnings(), ViewWriter(args.out, len(cameras)) as writer:
        warnings.simplefilter("ignore", InvalidPointsWarning)  # the line above says it once
        views = render_scene(loaded, cloud, cameras, args.condition, args.chunk, torch_device(args.device),
                             options=InputOptions(up=args.up, invalid="error" if args.strict else "drop"),
                             on_view=writer)
    print(f"wrote {len(views)} views to {args.out}")
    return 0

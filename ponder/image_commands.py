"""``ponder images``: the multi-view image branch (``model.images``) on the command line.

    ponder images features --images DIR --cameras CAMS.json -o OUT.npz [--checkpoint DIR] [--bounds ...]
    ponder images render --images DIR --cameras CAMS.json --novel NOVEL.json -o OUT_DIR [--checkpoint DIR]
    ponder images train --config CFG [--out DIR] [--resume] [--image-weights FILE]
    ponder images evaluate --config CFG [--checkpoint DIR | --untrained]
    ponder images train-segment --config CFG [--out DIR] [--init IMAGE_MODEL_DIR] [--resume]
    ponder images evaluate-segment --config CFG [--checkpoint DIR] [--point-checkpoint CKPT]

Handlers import their dependencies lazily (``ponder --help`` stays quick). Bad input (views without poses,
non-rigid poses, images whose size disagrees with the intrinsics, one view, views that see nothing of the
volume) raises ``model.images.ImageInputError``, a ValueError: exit code 2 with the message.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from training.cli_common import add_command
from training.images import cli as images_cli

DEFAULT_IMAGE_MODEL = Path(__file__).resolve().parent.parent / "model" / "default_model" / "images"


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    images = subparsers.add_parser("images", help="posed RGB images without depth: features, novel views, training")
    sub = images.add_subparsers(dest="images_command", metavar="ACTION", required=True)

    p = sub.add_parser("features", help="per-voxel features of the scene that posed images show (NPZ)")
    _add_input_arguments(p)
    p.add_argument("-o", "--out", type=Path, required=True, help="output .npz: features (M, C), centres (M, 3) "
                   "metres, views_seeing (M,), grid_index (M, 3), lifted_grid_shape (X, Y, Z), world_to_unit, bounds")
    p.set_defaults(handler=run_features)

    p = sub.add_parser("render", help="render novel views (colour + depth) of the scene that posed images show")
    _add_input_arguments(p)
    p.add_argument("--novel", type=Path, required=True, help="cameras JSON of the views to render (same frame)")
    p.add_argument("-o", "--out", type=Path, required=True, help="output folder (created)")
    p.add_argument("--chunk", type=int, default=4096, help="rays rendered at a time (default 4096)")
    p.add_argument("--max-pixels", type=int, default=None,
                   help="refuse novel cameras whose images add up to more pixels (default: the service's "
                        "PONDER_MAX_RENDER_PIXELS default, 4194304)")
    p.set_defaults(handler=run_render)

    add_command(sub, "train", "pre-train an image model by rendering held-out views",
                images_cli.add_train_arguments, images_cli.run_train)
    add_command(sub, "evaluate", "held-out-view PSNR and depth error of an image model",
                images_cli.add_evaluate_arguments, images_cli.run_evaluate)
    add_command(sub, "train-segment", "fine-tune a segmentation head on the lifted volume (generated rooms)",
                images_cli.add_segment_train_arguments, images_cli.run_segment_train)
    add_command(sub, "evaluate-segment", "per-point mIoU of an image segmentation model on held-out rooms",
                images_cli.add_segment_evaluate_arguments, images_cli.run_segment_evaluate)


def _add_input_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", type=Path, required=True, help="folder of PNG/JPEG views")
    p.add_argument("--cameras", type=Path, required=True,
                   help="cameras JSON (model/render/cameras.py; optional 'image' per camera and top-level 'bounds') "
                        "or a nerfstudio transforms.json")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help=f"image model folder (default: the bundled {DEFAULT_IMAGE_MODEL.relative_to(DEFAULT_IMAGE_MODEL.parents[2])})")
    p.add_argument("--bounds", type=float, nargs=6, default=None, metavar=("XMIN", "YMIN", "ZMIN", "XMAX", "YMAX", "ZMAX"),
                   help="scene box in metres (default: the cameras file's 'bounds', else estimated from the frusta)")
    p.add_argument("--far", type=float, default=4.0, help="metres to reach when estimating the box (default 4)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--max-input-pixels", type=int, default=16 << 20, metavar="N",
                   help="most pixels of all input views together, read from their headers before decoding "
                        "(default 16777216; the model holds ~90 bytes per input pixel)")


def _load(args: argparse.Namespace):
    import numpy as np

    from model.devices import torch_device
    from model.images import estimate_bounds, load_image_model, parse_bounds, read_image_folder

    torch_device(args.device)  # a clear error for CUDA without a GPU, before anything is read
    if args.far <= 0:
        raise ValueError(f"--far must be positive, got {args.far}")
    checkpoint = args.checkpoint or DEFAULT_IMAGE_MODEL
    if args.checkpoint is None and not checkpoint.is_dir():
        raise ValueError("no bundled image model in this installation; pass --checkpoint (an image model folder "
                         "written by `ponder images train`)")
    views, bounds = read_image_folder(args.images, args.cameras, args.max_input_pixels)
    if args.bounds is not None:
        bounds = parse_bounds(np.asarray(args.bounds).reshape(2, 3))
    if bounds is None:
        bounds = estimate_bounds(views.cameras, args.far)
    return load_image_model(checkpoint, args.device), views, bounds


def run_features(args: argparse.Namespace) -> int:
    import numpy as np

    from model.files import replaced_on_success
    from model.images import image_features
    from model.files import check_output_file

    # before the model: an .npz named .npy (or a path that cannot be written) is refused, not found out later
    check_output_file(args.out, "-o", (".npz",), "per-voxel features of posed images (NumPy archive)")
    model, views, bounds = _load(args)
    result = image_features(model, views, bounds)
    with replaced_on_success(args.out) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **result.arrays())
    print(f"{len(views.cameras)} views -> {len(result.features)} voxels seen of {int(np.prod(result.grid_shape))}, "
          f"{result.features.shape[1]} channels: {args.out}")
    return 0


def run_render(args: argparse.Namespace) -> int:
    from model.images import render_from_images
    from model.images.inputs import parse_cameras
    from model.render.cameras import read_camera_document

    from ponder.render_commands import ViewWriter, check_out_folder, check_pixels, default_max_pixels

    if args.chunk < 1:
        raise ValueError(f"--chunk must be positive, got {args.chunk}")
    max_pixels = default_max_pixels() if args.max_pixels is None else args.max_pixels
    if max_pixels < 1:
        raise ValueError(f"--max-pixels must be positive, got {max_pixels}")
    check_out_folder(args.out)
    novel = parse_cameras(read_camera_document(args.novel))[0]
    check_pixels(novel, max_pixels)
    model, views, bounds = _load(args)
    with ViewWriter(args.out, len(novel)) as writer:
        rendered = render_from_images(model, views, novel, bounds, args.chunk, on_view=writer)
    print(f"wrote {len(rendered)} views to {args.out}")
    return 0

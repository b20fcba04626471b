"""Inference subcommands: ``ponder features`` and ``ponder segment``.

They live in the composition root because they choose among every encoder backend: the model's own
(``spconv``, ``torch`` = the spconv-free engine) and the exported ones (``onnxruntime``, ``tensorrt``),
which model must not import. Without ``--backend`` the fastest exact encoder for the device is used.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from model.arguments import positive_int

from model.errors import CommandError
from model.files import check_output_file

BACKENDS = ("spconv", "torch", "onnxruntime", "tensorrt")  # = export.backends.BACKENDS (kept import-free for --help)
UP_AXES = ("z", "-z", "y", "-y", "x", "-x", "auto")  # = model.pointcloud.gravity.UP_AXES
CONVENTION = ("The model expects metres with z up (indoor scenes: floor at the bottom); use --up for scans in "
              "another frame. Outputs keep the input's length, order and frame.")
INPUT_HELP = ("point cloud: .ply .las .laz .npy .npz .pcd .xyz .txt .bin, or a scene folder with coord.npy "
              "(metres, z up; see --up)")
# = service/settings.py max_voxels (PONDER_MAX_VOXELS); a literal so --help need not import pydantic.
# Encoder memory grows ~3 KB per voxel with the published-size model: 1.5 M voxels is a few GiB.
DEFAULT_MAX_VOXELS = 1_500_000
# The models are indoor models: the largest indoor scans (a warehouse, a building floor) span a few hundred
# metres, while the same rooms in millimetres span thousands of units (a 3 m room reads as 3,000 "metres").
MILLIMETRE_EXTENT_M = 1000.0


def positive_float(text: str) -> float:
    """argparse type of --grid-size: a finite number > 0 (0 used to fall back to the model's grid silently)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of metres, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number of metres > 0, got {text}")
    return value


def add_max_voxels_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-voxels", type=positive_int, default=None, metavar="N",
                   help=f"refuse a scene with more voxels than this at the grid size, counted before the model "
                        f"runs (default {DEFAULT_MAX_VOXELS:,}, as the service's PONDER_MAX_VOXELS; memory grows "
                        "with the voxel count)")


def check_device(name: str) -> None:
    """Refuse ``--device cuda`` without CUDA before anything loads: otherwise torch fails deep inside the model
    (``AssertionError: Torch not compiled with CUDA enabled``) with a traceback and exit 1."""
    if name != "cuda":
        return
    import torch

    if torch.cuda.is_available():
        return
    why = ("this PyTorch build has no CUDA support" if torch.version.cuda is None
           else "no CUDA GPU is visible to PyTorch (driver, CUDA_VISIBLE_DEVICES)")
    raise CommandError(f"CUDA is not available: {why}; use --device cpu")


def rotation_text(rotation) -> str:
    """The one line every command prints for an --up rotation (R row-major, ``coord_z_up = R @ coord``)."""
    rows = "; ".join(" ".join(f"{v:.6f}" for v in row) for row in rotation)
    return f"up: rotated the input into z-up by [{rows}] (row-major, coord_z_up = R @ coord)"


def check_scale(cloud) -> None:
    """Warn when the cloud's extent suggests millimetres (see MILLIMETRE_EXTENT_M)."""
    import numpy as np

    from model.prepare import invalid_rows

    coord = cloud.coord[~invalid_rows(cloud)]
    if len(coord) == 0:
        return
    extent = float(np.max(coord.max(axis=0) - coord.min(axis=0)))
    if extent > MILLIMETRE_EXTENT_M:
        import warnings

        warnings.warn(f"{cloud.source} spans {extent:,.0f} m along its longest side; the model expects metres "
                      "(indoor scenes span tens of metres): if the coordinates are millimetres, scale them by 0.001",
                      UserWarning, stacklevel=2)


def check_voxels(cloud, grid_size: float, cap: int | None) -> int:
    """Count the scene's voxels at ``grid_size`` before normals, kernel maps and the encoder (whose memory grows
    with the count) and refuse more than ``cap`` (None = DEFAULT_MAX_VOXELS). Counted in the input's frame, as
    the service does (an --up rotation changes the count only at voxel borders)."""
    import numpy as np

    from model.pointcloud.voxelize import count_voxels
    from model.prepare import invalid_rows

    cap = DEFAULT_MAX_VOXELS if cap is None else cap
    coord = cloud.coord[~invalid_rows(cloud)]
    voxels = count_voxels(coord, grid_size)
    if voxels <= cap:
        return voxels
    extent = float(np.max(coord.max(axis=0) - coord.min(axis=0)))
    hint = (f"; the cloud spans {extent:,.0f} m: check its units (the model expects metres) or use a coarser "
            "--grid-size" if extent > MILLIMETRE_EXTENT_M else "; split the scene or use a coarser --grid-size")
    raise CommandError(f"{cloud.source}: {voxels:,} voxels at {grid_size:g} m exceed the cap of {cap:,} "
                       f"(--max-voxels N raises it; memory grows with the voxel count){hint}")


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", "-c", help="official .pth or our checkpoint folder (default: the bundled model)")
    p.add_argument("--condition", help="dataset condition of PDNorm/PPT models (e.g. ScanNet, S3DIS, Structured3D)")
    p.add_argument("--grid-size", type=positive_float,
                   help="voxel size in metres, > 0 (default: the model's, usually 0.02)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--format", dest="input_format", help="input format when the suffix does not tell")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow full unpickling of the checkpoint (only for files you trust)")
    p.add_argument("--backend", choices=BACKENDS,
                   help="encoder: torch = the spconv-free engine (valid pairs on CPU, gather on CUDA), spconv = the "
                        "model's spconv layers, onnxruntime = the exported graph (CPU/CUDA), tensorrt = onnxruntime's "
                        "TensorRT provider (default: the fastest exact one for the device, the torch engine)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                   help="torch engine only: bf16 = bfloat16 GEMM operands with float32 sums (AMX/AVX512-BF16; "
                        "not bit-exact, see README)")
    p.add_argument("--engine", help="exported .onnx encoder for --backend onnxruntime/tensorrt "
                                    "(default: export once and cache under ~/.cache/ponder)")
    p.add_argument("--up", default="z", choices=UP_AXES,
                   help="the input's up axis (the model expects z-up metres): the cloud and its normals are rotated "
                        "into z-up before voxelisation and the rotation is printed; auto = estimate gravity from the "
                        "scan's planes (see README). Default z")
    p.add_argument("--strict", action="store_true",
                   help="refuse a cloud with NaN/inf points (exit 2) instead of dropping them from the model's "
                        "input with a warning (dropped points get NaN features and label -1)")
    add_max_voxels_argument(p)


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("features", help="per-point encoder features of a point cloud (or per-voxel "
                              "features of posed images with --images)", description=CONVENTION)
    p.add_argument("input", nargs="?", help=INPUT_HELP)
    p.add_argument("-o", "--output", required=True,
                   help="output .npy (N x C float32, input order; H x W x C for an organised PCD); with --images "
                        "an .npz of per-voxel features and voxel centres (see `ponder images features`). The "
                        "suffix must match: .npy for point clouds, .npz with --images")
    p.add_argument("--images", type=Path, help="instead of a point cloud: a folder of posed PNG/JPEG views (no depth), "
                                               "encoded by the image model (default: the bundled one)")
    p.add_argument("--cameras", type=Path, help="with --images: cameras JSON or a nerfstudio transforms.json")
    p.add_argument("--bounds", type=float, nargs=6, metavar=("XMIN", "YMIN", "ZMIN", "XMAX", "YMAX", "ZMAX"),
                   help="with --images: scene box in metres (default: the cameras file's, else from the frusta)")
    p.add_argument("--far", type=float, default=4.0, help="with --images: metres to reach when estimating the box")
    p.add_argument("--max-input-pixels", type=int, default=16 << 20, metavar="N",
                   help="with --images: most pixels of all views together (default 16777216; see ponder images)")
    p.add_argument("--per-voxel", action="store_true",
                   help="write voxel features (M x C) and OUTPUT.point_to_voxel.npy instead of per-point rows")
    add_model_arguments(p)
    p.set_defaults(handler=run_features)

    p = subparsers.add_parser("segment", help="per-point semantic labels and logits", description=CONVENTION)
    p.add_argument("input", help=INPUT_HELP)
    p.add_argument("-o", "--output", required=True,
                   help="output .npz (the suffix must be .npz) with labels (N; H x W for an organised PCD), "
                        "logits, class_names")
    p.add_argument("--precise", action="store_true",
                   help="official precise mode: 13 test-time augmentations x fragments, probabilities voted")
    p.add_argument("--colored", metavar="PLY",
                   help="also write the points coloured by class (fixed palette, vertex property 'label') "
                        "as a binary .ply for MeshLab / CloudCompare; points with NaN/inf coordinates are left "
                        "out (the line printed says how many); georeferenced input is written in world "
                        "coordinates as double")
    add_model_arguments(p)
    p.set_defaults(handler=run_segment)


def _steps(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", file=sys.stderr, disable=not sys.stderr.isatty(),
                bar_format="{desc}: {n}/{total} {postfix}")


def _load(args):
    from model.pointcloud.readers import read_point_cloud

    check_device(args.device)
    progress = _steps(3, "ponder")
    progress.set_postfix_str(f"reading {args.input}")  # read first: bad input fails before the model loads
    cloud = read_point_cloud(Path(args.input), format=args.input_format, keep_invalid=not args.strict)
    check_scale(cloud)
    progress.update()
    progress.set_postfix_str("loading model")
    from export.backends import load  # torch (~1-2 s); spconv only for --backend spconv

    predictor = load(args.checkpoint, device=args.device, trust_checkpoint=args.trust_checkpoint,
                     backend=args.backend, precision=args.precision, engine=args.engine)
    check_voxels(cloud, args.grid_size or predictor.config.grid_size, args.max_voxels)
    progress.update()
    progress.set_postfix_str(f"running on {len(cloud):,} points")
    return predictor, cloud, progress


def _write_npy(path: Path, array) -> None:
    import numpy as np

    from model.files import replaced_on_success

    with replaced_on_success(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)


def _options(args):
    from model.prepare import InputOptions

    return InputOptions(up=args.up, invalid="error" if args.strict else "drop")


def report_prepared(prepared, outcome: str = "NaN features / label -1 in the output") -> None:
    """The CLI lines for what model.prepare did to the input (dropped rows, up rotation), shared by
    features, segment and detect."""
    if prepared is None:
        return
    if prepared.dropped:
        print(f"warning: dropped {prepared.dropped:,} of {prepared.num_input:,} points with NaN or infinite "
              f"coordinates or normals ({outcome}; --strict refuses them)", file=sys.stderr)
    if prepared.rotation is not None:
        print(rotation_text(prepared.rotation), file=sys.stderr)


def _quiet_invalid_warning() -> None:
    import warnings

    from model.prepare import InvalidPointsWarning

    warnings.simplefilter("ignore", InvalidPointsWarning)  # report_prepared prints one line instead


def run_image_features(args) -> int:
    """``ponder features --images DIR --cameras CAMS``: the image branch (same as ``ponder images features``)."""
    from ponder.image_commands import run_features as run_image_branch

    if args.input is not None:
        raise ValueError("give either a point cloud INPUT or --images DIR, not both")
    if args.cameras is None:
        raise ValueError("--images needs --cameras (a cameras JSON or a nerfstudio transforms.json)")
    if (args.backend not in (None, "torch") or args.precision != "fp32" or args.up != "z" or args.condition
            or args.max_voxels is not None or args.grid_size is not None):
        raise ValueError("--backend/--precision/--up/--condition/--grid-size/--max-voxels apply to point clouds, "
                         "not to --images")
    image_args = argparse.Namespace(images=args.images, cameras=args.cameras, bounds=args.bounds, far=args.far,
                                    device=args.device, out=Path(args.output), max_input_pixels=args.max_input_pixels,
                                    checkpoint=Path(args.checkpoint) if args.checkpoint else None)
    return run_image_branch(image_args)


def run_features(args) -> int:
    from model.results import organised

    if args.images is not None:
        return run_image_features(args)
    if args.input is None:
        raise ValueError("give a point cloud INPUT (or --images DIR --cameras CAMS.json for posed images)")
    out = check_output_file(args.output, "-o", (".npy",), "per-point features of a point cloud (NumPy array)")
    if args.per_voxel:
        check_output_file(out.with_suffix(".point_to_voxel.npy"), "-o")
    _quiet_invalid_warning()
    predictor, cloud, progress = _load(args)
    result = predictor.features(cloud, args.condition, args.grid_size, _options(args))
    progress.update()
    progress.close()
    report_prepared(result.prepared)
    shape = result.prepared.grid_shape if result.prepared is not None else None
    if args.per_voxel:
        _write_npy(out, result.voxel_features)
        _write_npy(out.with_suffix(".point_to_voxel.npy"), organised(result.input_point_to_voxel(), shape))
    else:
        _write_npy(out, organised(result.point_features(), shape))
    print(f"wrote {out}: {len(cloud):,} points, {len(result.voxel_features):,} voxels, "
          f"{result.voxel_features.shape[1]} channels", file=sys.stderr)
    return 0


def run_segment(args) -> int:
    import numpy as np

    from model.files import replaced_on_success
    from model.results import organised

    out = check_output_file(args.output, "-o", (".npz",), "segmentation (labels, logits, class_names in a NumPy "
                            "archive)")
    colored = check_output_file(args.colored, "--colored", (".ply",), "the coloured cloud (binary PLY)") \
        if args.colored else None

    _quiet_invalid_warning()
    predictor, cloud, progress = _load(args)
    result = predictor.segment(cloud, args.condition, args.grid_size, precise=args.precise, options=_options(args))
    progress.update()
    progress.close()
    report_prepared(result.prepared)
    shape = result.prepared.grid_shape if result.prepared is not None else None
    with replaced_on_success(out) as tmp, open(tmp, "wb") as f:  # a handle: np.savez(path) would append .npz
        np.savez(f, labels=organised(result.labels, shape), logits=organised(result.logits, shape),
                 class_names=np.array(result.class_names, dtype=str))
    seen = result.labels[result.labels >= 0]
    counts = np.bincount(seen, minlength=len(result.class_names))
    top = ", ".join(f"{result.class_names[i]} {counts[i]:,}" for i in np.argsort(-counts)[:5] if counts[i])
    print(f"wrote {out}: {len(cloud):,} points; most frequent: {top}", file=sys.stderr)
    if colored is not None:
        from model.pointcloud.palette import write_labelled_points

        origin = np.asarray(cloud.origin, dtype=np.float64)
        # Georeferenced input (world = coord + origin): world coordinates as double; float32 would be off by up
        # to 0.125 m at UTM magnitudes. Ordinary scans stay float32.
        world = cloud.coord.astype(np.float64) + origin if np.any(origin) else cloud.coord
        keep = result.labels >= 0  # dropped NaN/inf points have no position to draw
        write_labelled_points(colored, world[keep], result.labels[keep], result.class_names)
        left_out = int(len(keep) - keep.sum())
        note = (f"; left out {left_out:,} of {len(keep):,} points with NaN or infinite coordinates (no position "
                f"to draw; label -1 in {out})" if left_out else "")
        print(f"wrote {colored}: {int(keep.sum()):,} points coloured by class{note}", file=sys.stderr)
    return 0

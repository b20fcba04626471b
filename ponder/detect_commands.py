"""``ponder detect``: 3D object boxes of a point cloud, written as JSON (``format: ponder-detections/1``)::

    ponder detect INPUT -o BOXES.json [--checkpoint CKPT] [--score 0.3] [--iou 0.25] [--condition C]

    {"format": "ponder-detections/1", "source": "room.ply", "box_convention": "...",
     "class_names": [...],
     "detections": [{"label": "chair", "label_id": 2, "score": 0.91,
                     "center": [cx, cy, cz], "size": [dx, dy, dz], "yaw": 0.12,
                     "corners": [[x, y, z] x 8]}, ...]}

Box convention (model/detection/boxes.py): ``center`` is the box centre in the input cloud's frame and units
(metres); ``size`` the full edge lengths along the box's own x, y, z axes; ``yaw`` the rotation of the box's x
axis about +z in radians, counter-clockwise seen from above (x axis along (cos yaw, sin yaw, 0)); ``corners``
the bottom face then the top face, each counter-clockwise from above. Detections are sorted by score.

It runs a trained model, so it lives in the composition root beside ``segment``, not in training
(``ponder train detect`` / ``ponder evaluate detect`` stay in `training.detect.cli`).
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

from model.pointcloud.gravity import UP_AXES
from model.files import check_output_file
from ponder.inference_commands import (INPUT_HELP, add_max_voxels_argument, check_device, check_scale, check_voxels,
                                       report_prepared)


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("detect", help="3D object boxes of a point cloud (JSON)")
    p.add_argument("input", type=Path, help=INPUT_HELP)
    p.add_argument("-o", "--output", type=Path, required=True, help="output JSON (format ponder-detections/1)")
    p.add_argument("--checkpoint", "-c", default=None, help="detection checkpoint (default: the bundled model)")
    p.add_argument("--score", type=float, default=None, help="lowest score kept (default: the model's, 0.3)")
    p.add_argument("--iou", type=float, default=None, help="per-class NMS IoU threshold (default: the model's, 0.25)")
    p.add_argument("--condition", default=None, help="dataset condition of PDNorm/PPT encoders")
    p.add_argument("--format", dest="input_format", default=None, help="input format when the suffix does not tell")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--trust-checkpoint", action="store_true", help="allow full unpickling of an official .pth")
    p.add_argument("--up", default="z", choices=UP_AXES,
                   help="the input's up axis (the model expects z-up metres; auto = estimate gravity). Box centres "
                        "and corners are written in the input's frame, size and yaw about gravity. Default z")
    p.add_argument("--strict", action="store_true",
                   help="refuse a cloud with NaN/inf points (exit 2) instead of dropping them with a warning")
    p.add_argument("--ply", type=Path, default=None,
                   help="also write the boxes as wireframes (12 PLY edges per box, coloured by class) for "
                        "MeshLab / CloudCompare")
    add_max_voxels_argument(p)
    p.set_defaults(handler=run_detect)


def run_detect(args: argparse.Namespace) -> int:
    from model.detection.predict import detect
    from model.files import replaced_on_success
    from model.pointcloud.readers import read_point_cloud
    from model.prepare import InputOptions, InvalidPointsWarning
    from model.results import detections_to_input_frame

    for name, value in (("--score", args.score), ("--iou", args.iou)):
        if value is not None and not 0 <= value <= 1:
            raise ValueError(f"{name} must lie in [0, 1], got {value}")
    check_device(args.device)
    check_output_file(args.output, "-o", (".json",), "the boxes (JSON)")
    if args.ply is not None:
        check_output_file(args.ply, "--ply", (".ply",), "the box wireframes (binary PLY)")
    # bad input fails before the model loads
    cloud = read_point_cloud(args.input, format=args.input_format, keep_invalid=not args.strict)
    check_scale(cloud)
    from model.inference import default_checkpoint, load_predictor

    checkpoint = args.checkpoint or default_checkpoint("detect")
    predictor = load_predictor(checkpoint, device=args.device, trust_checkpoint=args.trust_checkpoint)
    check_voxels(cloud, predictor.config.grid_size, args.max_voxels)  # detect() voxelises at the model's grid
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InvalidPointsWarning)  # report_prepared prints one line instead
        prepared = predictor.prepare_points(cloud, options=InputOptions(up=args.up,
                                                                        invalid="error" if args.strict else "drop"))
    report_prepared(prepared, "left out of the detection")
    result = detect(predictor, prepared.cloud, args.condition, score_threshold=args.score, iou_threshold=args.iou)
    document = detections_to_input_frame(result.to_json(str(args.input)), prepared.rotation)
    with replaced_on_success(args.output) as tmp:
        tmp.write_text(json.dumps(document, indent=1))
    if args.ply is not None:
        from model.detection import box_corners
        from model.pointcloud.palette import write_box_wireframes

        corners = prepared.to_input_frame(box_corners(result.boxes)) if len(result) else []
        write_box_wireframes(args.ply, corners, result.labels, result.class_names)
    counts: dict[str, int] = {}
    for label in result.labels:
        counts[result.class_names[int(label)]] = counts.get(result.class_names[int(label)], 0) + 1
    summary = ", ".join(f"{n} {name}" for name, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    print(f"wrote {args.output}: {len(result)} boxes from {len(cloud):,} points" + (f" ({summary})" if summary else ""))
    return 0

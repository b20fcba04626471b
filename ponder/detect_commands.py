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
import sys
from pathlib import Path

import numpy as np

from model.pointcloud.gravity import UP_AXES


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("detect", help="3D object boxes of a point cloud (JSON)")
    p.add_argument("input", type=Path, help="point cloud: .ply .las .laz .npy .npz .pcd .xyz .txt .bin")
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
    p.set_defaults(handler=run_detect)


def run_detect(args: argparse.Namespace) -> int:
    from model.detection.predict import detect
    from model.devices import torch_device
    from model.files import replaced_on_success
    from model.pointcloud.readers import read_point_cloud
    from model.prepare import InputOptions
    from model.results import detections_to_input_frame

    for name, value in (("--score", args.score), ("--iou", args.iou)):
        if value is not None and not 0 <= value <= 1:
            raise ValueError(f"{name} must lie in [0, 1], got {value}")
    torch_device(args.device)
    if args.output.is_dir():
        raise IsADirectoryError(f"{args.output}: is a folder; -o takes a .json file path")
    if args.ply is not None and args.ply.is_dir():
        raise IsADirectoryError(f"{args.ply}: is a folder; --ply takes a .ply file path")
    # bad input fails before the model loads
    cloud = read_point_cloud(args.input, format=args.input_format, keep_invalid=not args.strict)
    from model.inference import default_checkpoint, load_predictor

    checkpoint = args.checkpoint or default_checkpoint("detect")
    predictor = load_predictor(checkpoint, device=args.device, trust_checkpoint=args.trust_checkpoint)
    prepared = predictor.prepare_points(cloud, options=InputOptions(up=args.up,
                                                                    invalid="error" if args.strict else "drop"))
    if prepared.dropped:
        print(f"warning: {prepared.dropped:,} of {prepared.num_input:,} points have NaN/inf coordinates and were "
              "left out", file=sys.stderr)
    if prepared.rotation is not None:
        print(f"up={args.up}: rotated into z-up by {np.round(prepared.rotation, 4).tolist()}", file=sys.stderr)
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

"""Write a synthetic scene in the real on-disk layouts, so the readers (and a user's real ScanNet
data) go through the same code.

Point scene (newer Pointcept folder layout; PonderV2 itself uses one pickled ``.pth`` per scene,
which we do not write):
    <scene_dir>/coord.npy (N,3) float32, color.npy (N,3) uint8, normal.npy (N,3) float32,
    segment20.npy (N,) int64 (ScanNet-20 index, -1 ignore), instance.npy (N,) int64,
    boxes.npy (M,7) float32 [cx,cy,cz,dx,dy,dz,yaw], box_labels.npy (M,) int64 (ScanNet-20 index),
    box_instances.npy (M,) int64 (the instance id of each box's points).

RGB-D scene (the ScanNet ``reader.py`` export, frame i in file i):
    color/<i>.jpg (JPEG quality 95, same size and camera as depth), depth/<i>.png (uint16 mm, 0 = none),
    pose/<i>.txt (4x4 camera-to-world), label/<i>.png (uint8 NYU40 id, 0 = none; the official
    VALID_CLASS_IDS_20 mapping gives ScanNet-20), instance/<i>.png (uint16 instance id + 1, 0 = none;
    not in the official export), intrinsic/{intrinsic,extrinsic}_{color,depth}.txt (4x4; colour and
    depth share one camera here, so the extrinsics are identities), <scene_id>.txt (ScanNet meta).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from .camera import Frames
from .scene import Scene

JPEG_QUALITY = 95


def write_point_scene(scene_dir: str | Path, scene: Scene) -> Path:
    scene_dir = Path(scene_dir)
    scene_dir.mkdir(parents=True, exist_ok=True)
    p = scene.points
    boxes, labels, instances = scene.detection_boxes()
    arrays = {
        "coord": p.coord.astype(np.float32),
        "color": p.color.astype(np.uint8),
        "normal": p.normal.astype(np.float32),
        "segment20": p.segment.astype(np.int64),
        "instance": p.instance.astype(np.int64),
        "boxes": boxes.astype(np.float32),
        "box_labels": labels,
        "box_instances": instances,
    }
    for name, array in arrays.items():
        np.save(scene_dir / f"{name}.npy", array, allow_pickle=False)
    return scene_dir


def _save_matrix(path: Path, matrix: np.ndarray) -> None:
    np.savetxt(path, matrix, fmt="%.17g")  # round-trips float64 exactly


def write_rgbd_scene(scene_dir: str | Path, scene_id: str, frames: Frames) -> Path:
    scene_dir = Path(scene_dir)
    for sub in ("color", "depth", "pose", "label", "instance", "intrinsic"):
        (scene_dir / sub).mkdir(parents=True, exist_ok=True)
    views, height, width = frames.depth.shape
    for i in range(views):
        Image.fromarray(frames.color[i]).save(scene_dir / "color" / f"{i}.jpg", quality=JPEG_QUALITY)
        Image.fromarray(frames.depth[i].astype(np.uint16)).save(scene_dir / "depth" / f"{i}.png")
        Image.fromarray(frames.nyu40[i].astype(np.uint8)).save(scene_dir / "label" / f"{i}.png")
        Image.fromarray((frames.instance[i] + 1).astype(np.uint16)).save(scene_dir / "instance" / f"{i}.png")
        _save_matrix(scene_dir / "pose" / f"{i}.txt", frames.pose[i])
    for kind in ("color", "depth"):
        _save_matrix(scene_dir / "intrinsic" / f"intrinsic_{kind}.txt", frames.intrinsic)
        _save_matrix(scene_dir / "intrinsic" / f"extrinsic_{kind}.txt", np.eye(4))
    k = frames.intrinsic
    meta = {
        "colorHeight": height,
        "colorWidth": width,
        "depthHeight": height,
        "depthWidth": width,
        "fx_color": k[0, 0],
        "fy_color": k[1, 1],
        "mx_color": k[0, 2],
        "my_color": k[1, 2],
        "fx_depth": k[0, 0],
        "fy_depth": k[1, 1],
        "mx_depth": k[0, 2],
        "my_depth": k[1, 2],
        "numColorFrames": views,
        "numDepthFrames": views,
        "numIMUmeasurements": 0,
        "axisAlignment": " ".join(["1", "0", "0", "0", "0", "1", "0", "0", "0", "0", "1", "0", "0", "0", "0", "1"]),
        "sceneType": "synthetic",
    }
    (scene_dir / f"{scene_id}.txt").write_text("".join(f"{key} = {value}\n" for key, value in meta.items()))
    return scene_dir

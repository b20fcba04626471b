"""Cameras: ScanNet-like depth intrinsics, a looping trajectory inside the room, and RGB-D rendering.

Conventions (spec §5.14): OpenCV camera axes (x right, y down, z forward); the pixel (u, v) ray
goes through K^-1 (u, v, 1) with integer pixel coordinates (no +0.5); poses are camera-to-world
4x4 (the ScanNet ``pose/<i>.txt`` convention); the pipeline's ``extrinsic`` is their inverse.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .raycast import cast_rays
from .shapes import BoxSet, SceneObject, rotate_z, surface_color

# ScanNet's depth camera at 640x480 (typical calibration; pixel centres at integer coordinates).
SCANNET_DEPTH_SIZE = (640, 480)
SCANNET_DEPTH_FOCAL = 577.87


def scannet_depth_intrinsic(downscale: int) -> tuple[np.ndarray, int, int]:
    """(4x4 K, width, height) of the ScanNet depth camera shrunk by an integer factor.

    With pixel centres at integer coordinates, shrinking by s maps c -> (c + 0.5) / s - 0.5.
    """
    w0, h0 = SCANNET_DEPTH_SIZE
    if downscale < 1 or w0 % downscale or h0 % downscale:
        raise ValueError(
            f"image_downscale must be a positive divisor of 640 and 480 (1, 2, 4, 5, 8, 10, 16, ...), got {downscale}"
        )
    w, h = w0 // downscale, h0 // downscale
    f = SCANNET_DEPTH_FOCAL / downscale
    k = np.eye(4)
    k[0, 0], k[1, 1] = f, f
    k[0, 2], k[1, 2] = (w0 / 2) / downscale - 0.5, (h0 / 2) / downscale - 0.5
    return k, w, h


def look_pose(position: np.ndarray, yaw: float, pitch: float) -> np.ndarray:
    """Camera-to-world 4x4 for a camera at position looking along yaw (about +z, 0 = +x) and
    pitch (positive = down), no roll. Columns of R are the camera x (right), y (down), z (forward)."""
    forward = np.array([np.cos(pitch) * np.cos(yaw), np.cos(pitch) * np.sin(yaw), -np.sin(pitch)])
    right = np.cross(forward, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    pose = np.eye(4)
    pose[:3, :3] = np.stack([right, down, forward], axis=1)
    pose[:3, 3] = position
    return pose


def camera_rays(intrinsic: np.ndarray, c2w: np.ndarray, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Origins and directions (H*W, 3) in row-major pixel order. Directions are R K^-1 (u, v, 1),
    not normalised, so the ray parameter of a hit is its z-depth."""
    u, v = np.meshgrid(np.arange(width, dtype=np.float64), np.arange(height, dtype=np.float64))
    pix = np.stack([u.ravel(), v.ravel(), np.ones(u.size)], axis=1)  # (H*W, 3)
    cam = pix @ np.linalg.inv(intrinsic[:3, :3]).T
    dirs = cam @ c2w[:3, :3].T
    return np.broadcast_to(c2w[:3, 3], dirs.shape).copy(), dirs


def box_distance(points: np.ndarray, boxes: BoxSet) -> np.ndarray:
    """(N,) distance from each point to the nearest box (0 inside)."""
    d = points[:, None, :] - boxes.center[None]  # (N, B, 3)
    local = rotate_z(d, -boxes.yaw[None, :])
    outside = np.maximum(np.abs(local) - boxes.half[None], 0.0)
    return np.linalg.norm(outside, axis=-1).min(axis=1)


def loop_trajectory(
    rng: np.random.Generator,
    room_size: np.ndarray,
    boxes: BoxSet,
    num_frames: int,
    height: tuple[float, float],
    pitch_deg: tuple[float, float],
    clearance: float = 0.25,
) -> np.ndarray:
    """(V, 4, 4) camera-to-world poses on an ellipse around the room centre, looking across the
    room (inwards, swinging +-0.9 rad so views also run along the walls), bobbing a little in
    height and pitch, as a person scanning a room from its edge does.
    A pose closer than clearance to any box is pulled towards the room centre."""
    centre = np.array([room_size[0] / 2, room_size[1] / 2])
    radii = np.maximum(room_size[:2] / 2 - 0.8, 0.15)
    h0 = rng.uniform(*height)
    p0 = np.deg2rad(rng.uniform(*pitch_deg))
    theta0, yaw_off = rng.uniform(0, 2 * np.pi), rng.uniform(-0.3, 0.3)
    phases = rng.uniform(0, 2 * np.pi, size=3)
    poses = []
    for i in range(num_frames):
        theta = theta0 + 2 * np.pi * i / max(num_frames, 1)
        xy = centre + radii * np.array([np.cos(theta), np.sin(theta)])
        z = float(np.clip(h0 + 0.08 * np.sin(theta + phases[0]), 0.8, room_size[2] - 0.3))
        for shrink in np.linspace(1.0, 0.0, 11):
            position = np.append(centre + shrink * (xy - centre), z)
            if box_distance(position[None], boxes)[0] >= clearance:
                break
        else:
            raise RuntimeError(f"no free camera position near {position.round(2)}: the room centre is blocked")
        yaw = theta + np.pi + yaw_off + 0.6 * np.sin(3 * theta + phases[1])
        pitch = p0 + 0.08 * np.sin(2 * theta + phases[2])
        poses.append(look_pose(position, yaw, pitch))
    return np.stack(poses) if poses else np.zeros((0, 4, 4))


@dataclass
class Frames:
    """RGB-D frames of one scene, V views of H x W pixels."""

    intrinsic: np.ndarray  # (4, 4) depth intrinsics
    pose: np.ndarray  # (V, 4, 4) camera-to-world
    depth: np.ndarray  # (V, H, W) uint16 millimetres, 0 = no hit
    color: np.ndarray  # (V, H, W, 3) uint8
    nyu40: np.ndarray  # (V, H, W) uint8, 0 = no hit
    segment: np.ndarray  # (V, H, W) int64 ScanNet-20 index, -1 = ignore / no hit
    instance: np.ndarray  # (V, H, W) int64, -1 = no hit

    @property
    def extrinsic(self) -> np.ndarray:
        """(V, 4, 4) world-to-camera, what the pre-training pipeline calls ``extrinsic``."""
        return np.linalg.inv(self.pose)


def render_frames(
    objects: list[SceneObject],
    boxes: BoxSet,
    intrinsic: np.ndarray,
    poses: np.ndarray,
    width: int,
    height: int,
    shading: bool,
) -> Frames:
    """Ray-cast every pixel of every view: z-depth, the surface colour at the hit, labels."""
    nyu = np.array([o.nyu40 for o in objects], dtype=np.int64)
    label = np.array([o.label for o in objects], dtype=np.int64)
    inst = np.array([o.instance for o in objects], dtype=np.int64)
    views = len(poses)
    depth = np.zeros((views, height * width), dtype=np.uint16)
    color = np.zeros((views, height * width, 3), dtype=np.uint8)
    nyu_map = np.zeros((views, height * width), dtype=np.uint8)
    seg = np.full((views, height * width), -1, dtype=np.int64)
    ins = np.full((views, height * width), -1, dtype=np.int64)
    for v, pose in enumerate(poses):
        origins, dirs = camera_rays(intrinsic, pose, width, height)
        hits = cast_rays(origins, dirs, boxes)
        mm = np.rint(hits.t * 1000.0)
        ok = hits.hit & (mm <= np.iinfo(np.uint16).max)
        box = hits.box[ok]
        points = origins[ok] + hits.t[ok, None] * dirs[ok]
        depth[v, ok] = mm[ok].astype(np.uint16)
        color[v, ok] = surface_color(boxes, box, points, hits.normal[ok], shading)
        obj = boxes.obj[box]
        nyu_map[v, ok], seg[v, ok], ins[v, ok] = nyu[obj], label[obj], inst[obj]
    shape = (views, height, width)
    return Frames(
        intrinsic.copy(),
        np.asarray(poses, dtype=np.float64),
        depth.reshape(shape),
        color.reshape(shape + (3,)),
        nyu_map.reshape(shape),
        seg.reshape(shape),
        ins.reshape(shape),
    )

"""``--up auto`` on one depth frame in its camera's axes (a Kinect/RealSense frame saved as it came).

Frames are ray-cast here from a furnished box room (floor, walls, optional ceiling, four boxes), so the true
up is known exactly. Before the single-view rule, 29 of 40 such frames came out ~90 degrees wrong (the view
axis, with a far wall at one end and nothing near, looked as lopsided as gravity)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from model.pointcloud.gravity import estimate_up, single_view_forward

ROOM = np.array([[0.0, 0.0, 0.0], [6.0, 5.0, 2.8]])
FURNITURE = [np.array(b, dtype=float) for b in (
    [[2.5, 1.5, 0.0], [3.7, 2.5, 0.75]], [[4.8, 0.2, 0.0], [5.9, 2.2, 0.9]],
    [[1.0, 3.8, 0.0], [2.4, 4.9, 0.45]], [[3.0, 4.4, 0.0], [4.5, 4.95, 2.0]])]
# columns: the OpenCV camera's x (right), y (down), z (forward) in a z-up world, looking along +x
OPENCV_AT_YAW_0 = np.array([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
OPENGL_FROM_OPENCV = np.diag([1.0, -1.0, -1.0])  # x right, y up, z backward


def _slabs(origin: np.ndarray, rays: np.ndarray, box: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with np.errstate(divide="ignore", invalid="ignore"):
        t1, t2 = (box[0] - origin) / rays, (box[1] - origin) / rays
    return np.nanmax(np.minimum(t1, t2), axis=1), np.nanmin(np.maximum(t1, t2), axis=1)


def depth_frame(pitch: float, yaw: float, position: tuple[float, float, float], ceiling: bool, seed: int,
                size: tuple[int, int] = (120, 160)) -> tuple[np.ndarray, np.ndarray]:
    """(points in OpenCV camera axes with NaN rows for pixels without depth, true up in those axes)."""
    height, width = size
    v, u = np.mgrid[0:height, 0:width]
    focal = 0.8 * width
    rays_cam = np.stack([(u - width / 2) / focal, (v - height / 2) / focal, np.ones(u.shape)], -1).reshape(-1, 3)
    cam_to_world = Rotation.from_euler("zy", [yaw, -pitch], degrees=True).as_matrix() @ OPENCV_AT_YAW_0
    origin, rays = np.asarray(position, dtype=float), rays_cam @ cam_to_world.T
    t = _slabs(origin, rays, ROOM)[1]  # inside the room: its far side
    for box in FURNITURE:
        near, far = _slabs(origin, rays, box)
        t = np.where((near <= far) & (near > 0) & (near < t), near, t)
    hit = origin + rays * t[:, None]
    rng = np.random.default_rng(seed)
    t[(~ceiling & (hit[:, 2] > ROOM[1, 2] - 0.01)) | (t * np.linalg.norm(rays, axis=1) > 5.0)
      | (rng.random(len(t)) < 0.05)] = np.nan  # no ceiling, beyond the sensor's range, dropouts
    points = rays_cam * t[:, None] + rng.normal(0.0, 0.003, rays_cam.shape)
    return points, cam_to_world.T @ np.array([0.0, 0.0, 1.0])


def _frames(count: int, seed: int):
    rng = np.random.default_rng(seed)
    for i in range(count):
        points, up = depth_frame(pitch=rng.uniform(-40, 5), yaw=rng.uniform(0, 360), ceiling=bool(i % 3),
                                 position=(rng.uniform(0.6, 5.4), rng.uniform(0.6, 4.4), rng.uniform(0.9, 1.7)),
                                 seed=i)
        points = points[np.isfinite(points).all(axis=1)]
        if i % 2:  # every other frame in OpenGL axes
            points, up = points @ OPENGL_FROM_OPENCV, OPENGL_FROM_OPENCV @ up
        yield points, up, (1 if i % 2 == 0 else -1)


def _angle(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.degrees(np.arccos(np.clip(a @ b / np.linalg.norm(a) / np.linalg.norm(b), -1.0, 1.0))))


def test_auto_up_of_single_depth_frames_in_camera_axes():
    errors, forwards = [], []
    for points, up, forward in _frames(16, seed=3):
        forwards.append((single_view_forward(points), forward))
        errors.append(_angle(estimate_up(points), up))
    assert all(found == expected for found, expected in forwards), forwards
    assert max(errors) < 25.0 and np.median(errors) < 2.0, np.round(errors, 1)


def test_whole_scans_are_not_single_views():
    """Generated rooms, whichever way they face, with the origin at a corner, at the middle, in front of them
    (0.6 to 5 room sizes away along z, where every point is within a camera's field of view) or 100 m below."""
    from training.data.synthetic import SceneConfig, generate_scene

    for seed in range(4):
        coord = generate_scene(seed, SceneConfig(num_frames=0, points_per_m2=300.0)).points.coord.astype(float)
        turned = coord @ Rotation.from_euler("xz", [(-90, 0, 90, 180)[seed], 40 * seed], degrees=True).as_matrix().T
        centred = turned - turned.mean(axis=0)
        extent = np.ptp(centred, axis=0).max()
        placed = [turned - turned.min(axis=0), centred, coord - coord.mean(axis=0) + [0, 0, 100.0]]
        placed += [centred + [0.0, 0.0, distance * extent] for distance in (0.6, 1.0, 2.0, 5.0)]
        assert [single_view_forward(c) for c in placed] == [0] * len(placed), seed


@pytest.mark.parametrize("forward", [1, -1])
def test_auto_up_of_a_frame_through_prepare(forward):
    """The rotation the CLI and the service apply: the frame's floor ends up horizontal and below the camera."""
    from model.pointcloud.cloud import PointCloud
    from model.prepare import InputOptions, prepare_cloud

    points, up = depth_frame(pitch=-20, yaw=35, position=(1.0, 1.2, 1.4), ceiling=False, seed=0)
    points = points[np.isfinite(points).all(axis=1)]
    if forward < 0:
        points, up = points @ OPENGL_FROM_OPENCV, OPENGL_FROM_OPENCV @ up
    cloud = PointCloud(coord=points.astype(np.float32), color=np.full((len(points), 3), 128, np.uint8))
    prepared = prepare_cloud(cloud, 0.02, ("color", "normal"), InputOptions(up="auto"))
    assert _angle(prepared.rotation @ up, np.array([0.0, 0.0, 1.0])) < 2.0

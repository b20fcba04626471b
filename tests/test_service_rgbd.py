"""Multi-view RGB-D fusion (service/rgbd.py) on an analytic room whose depth images are exact."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest_service import PLANES, look_at, png_bytes, render_planes  # noqa: E402

from service.rgbd import (Camera, RGBDError, RGBDView, decode_color, decode_depth, fuse_views,  # noqa: E402
                          parse_cameras)

K = np.array([[60.0, 0, 40.0], [0, 60.0, 30.0], [0, 0, 1]])
W, H = 80, 60
EYES = (np.array([0.5, -1.0, 1.5]), np.array([0.3, 1.2, 1.2]))
TARGET = np.array([1.5, 0.0, 0.3])


def views(scale: float = 1000.0) -> list[RGBDView]:
    out = []
    for i, eye in enumerate(EYES):
        pose = look_at(eye, TARGET)
        depth, color = render_planes(K, pose, W, H, scale)
        out.append(RGBDView(depth=depth, camera=Camera(K=K, camera_to_world=pose), color=color, name=str(i)))
    return out


def plane_distance(points: np.ndarray) -> np.ndarray:
    return np.min(np.stack([np.abs(points @ n - d) for n, d, _ in PLANES]), axis=0)


def test_fused_points_lie_on_the_scene_with_its_colours_and_camera_facing_normals():
    voxel = 0.02
    cloud = fuse_views(views(), depth_scale=1000.0, voxel_size=voxel)
    assert len(cloud) > 500 and cloud.color is not None and cloud.normal is not None
    # Depth is quantised to 1 mm; voxel averaging at the floor/wall edge mixes both planes.
    assert plane_distance(cloud.coord.astype(np.float64)).max() <= voxel
    floor = (cloud.coord[:, 2] < 0.002) & (cloud.coord[:, 0] < 1.9)
    wall = (np.abs(cloud.coord[:, 0] - 2.0) < 0.002) & (cloud.coord[:, 2] > 0.1)
    assert floor.sum() > 100 and wall.sum() > 100
    assert (cloud.color[floor] == PLANES[0][2]).all()
    assert (cloud.color[wall] == PLANES[1][2]).all()
    # Normals face the cameras: up on the floor, towards -x on the wall (cameras are at x < 2).
    assert np.median(cloud.normal[floor] @ np.array([0, 0, 1.0])) > 0.99
    assert np.median(cloud.normal[wall] @ np.array([-1.0, 0, 0])) > 0.99
    # Voxel downsampling: at most one point per voxel.
    keys = np.floor(cloud.coord / voxel).astype(np.int64)
    assert len(np.unique(keys, axis=0)) >= len(keys) * 0.95


def test_each_view_contributes_and_depth_scale_is_honoured():
    both = fuse_views(views(), voxel_size=0.02, normals=False)
    one = fuse_views(views()[:1], voxel_size=0.02, normals=False)
    assert len(both) > len(one)
    finer = fuse_views(views(10000.0), depth_scale=10000.0, voxel_size=0.02, normals=False)
    assert abs(len(finer) - len(both)) <= 0.05 * len(both)
    assert plane_distance(finer.coord.astype(np.float64)).max() <= 0.02


def test_max_depth_drops_far_pixels():
    near = fuse_views(views(), voxel_size=0.02, max_depth=1.5, normals=False)
    far = fuse_views(views(), voxel_size=0.02, max_depth=10.0, normals=False)
    assert 0 < len(near) < len(far)
    for view in views():
        eye = view.camera.camera_to_world[:3, 3]
        assert np.linalg.norm(near.coord - eye, axis=1).min() < 10  # sanity: points exist near the cameras


def test_camera_json_variants_agree():
    pose = look_at(EYES[0], TARGET)
    as_k = {"K": K.tolist(), "camera_to_world": pose.tolist()}
    as_fx = {"fx": 60, "fy": 60, "cx": 40, "cy": 30, "world_to_camera": np.linalg.inv(pose).tolist()}
    cams_a, scale_a = parse_cameras(json.dumps({"views": {"a": as_k}}))
    cams_b, _ = parse_cameras(json.dumps({"views": [as_fx]}))
    assert scale_a is None
    np.testing.assert_allclose(cams_a["a"].K, cams_b["0"].K)
    np.testing.assert_allclose(cams_a["a"].camera_to_world, cams_b["0"].camera_to_world, atol=1e-12)
    _, scale = parse_cameras(json.dumps({"depth_scale": 500, "0": as_k}))
    assert scale == 500


def test_png_round_trip_through_the_decoders():
    depth, color = render_planes(K, look_at(EYES[0], TARGET), W, H)
    np.testing.assert_array_equal(decode_depth(png_bytes(depth), "depth_0"), depth)
    np.testing.assert_array_equal(decode_color(png_bytes(color), "color_0"), color)


@pytest.mark.parametrize("make, message", [
    (lambda: fuse_views([]), "no RGB-D views"),
    (lambda: fuse_views([RGBDView(depth=np.zeros((4, 4), np.uint16), camera=Camera(K, np.eye(4)))]),
     "no valid depth"),
    (lambda: fuse_views([RGBDView(depth=np.ones((4, 4), np.uint16), camera=Camera(K, np.eye(4)),
                                  color=np.zeros((5, 4, 3), np.uint8), name="v")]), "same size"),
    (lambda: parse_cameras("{not json"), "not valid JSON"),
    (lambda: parse_cameras(json.dumps({"views": {"0": {"fx": 1}}})), "missing fy, cx, cy"),
    (lambda: parse_cameras(json.dumps({"views": {"0": {"K": [[1, 0], [0, 1]]}}})), "3x3"),
    (lambda: parse_cameras(json.dumps({"views": {"0": {"K": K.tolist(), "world_to_camera": np.zeros((4, 4)).tolist()}}})),
     "last row"),
    (lambda: parse_cameras(json.dumps({"views": {"0": {"K": K.tolist(), "world_to_camera": np.diag([2, 2, 2, 1]).tolist()}}})),
     "orthonormal"),
    (lambda: parse_cameras(json.dumps({"views": {"0": {"K": K.tolist(), "fx": 1}}})), "not both"),
    (lambda: parse_cameras(json.dumps({"views": {"0": {"K": K.tolist(), "camera_to_world": np.ones((4, 4)).tolist()}}})),
     "last row"),
    (lambda: decode_depth(png_bytes(np.zeros((4, 4), np.uint8)), "depth_0"), "16-bit"),
    (lambda: decode_color(b"not an image", "color_0"), "not a readable"),
])
def test_bad_input_names_the_problem(make, message):
    with pytest.raises(RGBDError, match=message):
        make()

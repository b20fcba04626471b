"""The official point-cloud transforms (training/transforms.py), checked against hand-worked cases."""

from __future__ import annotations

import numpy as np
import pytest

from training.transforms import (CenterShift, ChromaticAutoContrast, ChromaticJitter, ChromaticTranslation,
                                 Compose, ElasticDistortion, GridSample, RandomDropout, RandomFlip, RandomJitter,
                                 RandomRotate, RandomRotateTargetAngle, RandomScale, ShufflePoint, SphereCrop,
                                 rotation_matrix)

K = np.array([[60.0, 0, 40], [0, 60, 30], [0, 0, 1]])


def _scene(n: int = 500, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    coord = rng.uniform([0, 0, 0], [4, 3, 2.5], (n, 3)).astype(np.float32)
    normal = rng.normal(size=(n, 3))
    normal = (normal / np.linalg.norm(normal, axis=1, keepdims=True)).astype(np.float32)
    return {"coord": coord, "normal": normal, "color": rng.integers(0, 256, (n, 3)).astype(np.uint8),
            "segment": np.arange(n), "instance": np.arange(n) * 10,
            "extrinsic": np.stack([_look_at([2, -3, 1.5], [2, 1.5, 1]), _look_at([5, 1.5, 2], [2, 1.5, 1])]),
            "depth_scale": 0.001}


def _look_at(eye, target) -> np.ndarray:
    """World-to-camera (OpenCV axes: x right, y down, z forward) of a camera at ``eye`` looking at ``target``."""
    eye, target = np.asarray(eye, float), np.asarray(target, float)
    z = (target - eye) / np.linalg.norm(target - eye)
    x = np.cross(z, [0, 0, 1.0])
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    c2w = np.eye(4)
    c2w[:3, :3] = np.stack([x, y, z], axis=1)
    c2w[:3, 3] = eye
    return np.linalg.inv(c2w)


def _camera_view(data: dict) -> tuple[np.ndarray, np.ndarray]:
    """Per camera and point: pixel (u, v) and the world distance to the camera centre in sensor units
    (world units / depth_scale, i.e. what a depth image stores)."""
    homo = np.c_[data["coord"].astype(np.float64), np.ones(len(data["coord"]))]
    pixels, dists = [], []
    for m in data["extrinsic"]:
        cam = (homo @ m.T)[:, :3]
        uv = cam @ K.T
        pixels.append(uv[:, :2] / uv[:, 2:])
        centre = np.linalg.inv(m)[:3, 3]
        dists.append(np.linalg.norm(homo[:, :3] - centre, axis=1) / data["depth_scale"])
    return np.stack(pixels), np.stack(dists)


def test_rotation_matrices_by_hand():
    q = np.pi / 2
    assert np.allclose(rotation_matrix("z", q) @ [1, 0, 0], [0, 1, 0])
    assert np.allclose(rotation_matrix("x", q) @ [0, 1, 0], [0, 0, 1])
    assert np.allclose(rotation_matrix("y", q) @ [0, 0, 1], [1, 0, 0])
    with pytest.raises(ValueError, match="axis"):
        rotation_matrix("w", q)


def test_rotate_about_origin_and_bbox_centre():
    data = {"coord": np.array([[1, 0, 0], [0, 2, 0], [1, 2, 2]], np.float32),
            "normal": np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], np.float32)}
    out = RandomRotate(angle=(0.5, 0.5), axis="z", center=(0, 0, 0), p=1)(
        {k: v.copy() for k, v in data.items()}, np.random.default_rng(0))
    assert np.allclose(out["coord"], [[0, 1, 0], [-2, 0, 0], [-2, 1, 2]], atol=1e-6)
    assert np.allclose(out["normal"], [[0, 1, 0], [-1, 0, 0], [0, 0, 1]], atol=1e-6)
    # about the bbox centre (0.5, 1, 1) by pi: x -> 1 - x, y -> 2 - y
    out = RandomRotate(angle=(1, 1), axis="z", p=1)({k: v.copy() for k, v in data.items()}, np.random.default_rng(0))
    assert np.allclose(out["coord"], [[0, 2, 0], [1, 0, 0], [0, 0, 2]], atol=1e-6)
    skipped = RandomRotate(p=0)({k: v.copy() for k, v in data.items()}, np.random.default_rng(0))
    assert np.array_equal(skipped["coord"], data["coord"])


def test_target_angle_picks_from_the_list():
    data = {"coord": np.array([[1.0, 0, 0], [-1, 0, 0]], np.float32)}
    out = RandomRotateTargetAngle(angle=(1.0,), center=(0, 0, 0), p=1)(data, np.random.default_rng(3))
    assert np.allclose(out["coord"], [[-1, 0, 0], [1, 0, 0]], atol=1e-6)


def test_camera_updates_keep_every_projection():
    """After shift, rotations, scale and flips with keys=['extrinsic'], each point lands on the same pixel of
    each camera and its distance in sensor units is unchanged (depth images stay valid)."""
    data = _scene()
    before_px, before_d = _camera_view(data)
    cams = ["extrinsic"]
    pipeline = Compose([
        CenterShift(apply_z=True, keys=cams),
        RandomRotate(angle=(-1, 1), axis="z", center=(0, 0, 0), p=1, keys=cams),
        RandomRotate(angle=(-1 / 64, 1 / 64), axis="x", p=1, keys=cams),
        RandomRotate(angle=(-1 / 64, 1 / 64), axis="y", p=1, keys=cams),
        RandomScale(scale=(0.9, 1.1), keys=cams),
        RandomFlip(p=1, keys=cams),
        CenterShift(apply_z=False, keys=cams),
    ])
    out = pipeline(data, np.random.default_rng(7))
    after_px, after_d = _camera_view(out)
    assert out["depth_scale"] != 0.001
    assert np.allclose(after_px, before_px, atol=1e-3)
    assert np.allclose(after_d, before_d, rtol=1e-5)


def test_scale_multiplies_coord_and_depth_scale_alike():
    data = _scene()
    coord = data["coord"].copy()
    out = RandomScale(scale=(0.5, 2.0), keys=["extrinsic"])(data, np.random.default_rng(1))
    s = out["depth_scale"] / 0.001
    assert 0.5 <= s <= 2.0 and np.allclose(out["coord"], coord * s, rtol=1e-6)
    with pytest.raises(ValueError, match="anisotropic"):
        RandomScale(anisotropic=True)(_scene(), np.random.default_rng(0))
    free = RandomScale(scale=(0.5, 2.0), anisotropic=True)({"coord": coord.copy()}, np.random.default_rng(2))
    ratio = free["coord"] / coord
    assert not np.allclose(ratio[:, 0], ratio[:, 1])


def test_flip_negates_x_then_y():
    data = {"coord": np.array([[1, 2, 3]], np.float32), "normal": np.array([[0.6, 0.8, 0]], np.float32)}
    out = RandomFlip(p=1)({k: v.copy() for k, v in data.items()}, np.random.default_rng(0))
    assert np.array_equal(out["coord"], [[-1, -2, 3]]) and np.allclose(out["normal"], [[-0.6, -0.8, 0]])
    out = RandomFlip(p=0)({k: v.copy() for k, v in data.items()}, np.random.default_rng(0))
    assert np.array_equal(out["coord"], data["coord"])


def test_center_shift():
    data = {"coord": np.array([[1, 2, 3], [3, 6, 5]], np.float32)}
    assert np.array_equal(CenterShift(True)(dict(data), None)["coord"], [[-1, -2, 0], [1, 2, 2]])
    assert np.array_equal(CenterShift(False)(dict(data), None)["coord"], [[-1, -2, 3], [1, 2, 5]])


def test_dropout_keeps_the_official_count_and_row_alignment():
    data = _scene(1000)
    out = RandomDropout(ratio=0.8, p=1)(data, np.random.default_rng(0))
    expected = int(1000 * (1 - 0.8))  # 199: the official int() of a float product
    assert len(out["coord"]) == expected == len(np.unique(out["segment"]))
    src = _scene(1000)
    assert np.array_equal(out["coord"], src["coord"][out["segment"]])
    assert np.array_equal(out["instance"], out["segment"] * 10)
    assert out["extrinsic"].shape == (2, 4, 4)  # not a per-point array
    assert len(RandomDropout(0.8, p=0)(_scene(1000), np.random.default_rng(0))["coord"]) == 1000
    assert len(RandomDropout(0.5, p=1)(_scene(7), np.random.default_rng(0))["coord"]) == 3  # int(7·0.5)


def test_sphere_crop_keeps_the_nearest_points():
    data = _scene(300)
    centre = data["coord"][150].astype(np.float64)
    out = SphereCrop(point_max=50, mode="center")(data, np.random.default_rng(0))
    dist = np.linalg.norm(_scene(300)["coord"] - centre, axis=1)
    assert sorted(out["segment"]) == sorted(np.argsort(dist)[:50])
    assert np.array_equal(out["normal"], _scene(300)["normal"][out["segment"]])
    rate = SphereCrop(sample_rate=0.5)(_scene(300), np.random.default_rng(0))
    assert len(rate["coord"]) == 150
    # a random centre: the kept points are the 150 nearest to one of them
    full = _scene(300)["coord"]
    kept = set(rate["segment"].tolist())
    assert any(set(np.argsort(np.linalg.norm(full - full[c], axis=1))[:150].tolist()) == kept for c in kept)
    small = SphereCrop(point_max=1000)(_scene(300), np.random.default_rng(0))
    assert len(small["coord"]) == 300


def test_shuffle_keeps_rows_together():
    out = ShufflePoint()(_scene(100), np.random.default_rng(0))
    assert sorted(out["segment"]) == list(range(100)) and not np.array_equal(out["segment"], np.arange(100))
    assert np.array_equal(out["coord"], _scene(100)["coord"][out["segment"]])


def test_grid_sample_keeps_one_random_point_per_voxel():
    data = _scene(2000)
    out = GridSample(0.5)(data, np.random.default_rng(0))
    g = np.floor(_scene(2000)["coord"] / 0.5).astype(np.int64)
    g -= g.min(axis=0)
    assert len(out["coord"]) == len(np.unique(g, axis=0))
    assert np.array_equal(out["grid_coord"], g[out["segment"]])
    other = GridSample(0.5)(_scene(2000), np.random.default_rng(1))
    assert not np.array_equal(np.sort(out["segment"]), np.sort(other["segment"]))


def test_jitter_and_elastic_distortion():
    coord = _scene(400)["coord"]
    out = RandomJitter(sigma=0.01, clip=0.02)({"coord": coord.copy()}, np.random.default_rng(0))
    delta = out["coord"] - coord
    assert np.abs(delta).max() <= 0.02 + 1e-6 and delta.std() > 0.005
    a = ElasticDistortion(p=1)({"coord": coord.copy()}, np.random.default_rng(5))["coord"]
    b = ElasticDistortion(p=1)({"coord": coord.copy()}, np.random.default_rng(5))["coord"]
    moved = np.linalg.norm(a - coord, axis=1)
    assert np.array_equal(a, b) and moved.mean() > 1e-3 and moved.max() < 1.0
    # the displacement field is smooth: nearby points move alike
    i, j = np.argsort(np.linalg.norm(coord - coord[0], axis=1))[:2]
    far = np.argmax(np.linalg.norm(coord - coord[0], axis=1))
    assert np.linalg.norm((a - coord)[i] - (a - coord)[j]) < np.linalg.norm((a - coord)[i] - (a - coord)[far]) + 1e-6


def test_chromatic_transforms():
    color = np.array([[10, 20, 30], [110, 120, 30], [60, 70, 30]], np.uint8)
    out = ChromaticAutoContrast(p=1, blend=1.0)({"color": color.copy()}, np.random.default_rng(0))["color"]
    assert out.dtype == np.float32
    assert np.allclose(out[:, 0], [0, 255, 127.5]) and np.allclose(out[:, 2], 30)  # constant channel kept
    tr = ChromaticTranslation(p=1, ratio=0.05)({"color": color.copy()}, np.random.default_rng(0))["color"]
    shift = tr - color
    assert np.allclose(shift, shift[0]) and np.abs(shift).max() <= 0.05 * 255 + 1e-4
    jit = ChromaticJitter(p=1, std=0.5)({"color": color.copy()}, np.random.default_rng(0))["color"]
    assert jit.min() >= 0 and jit.max() <= 255 and not np.allclose(jit, color)
    assert np.array_equal(ChromaticJitter(p=0)({"color": color.copy()}, np.random.default_rng(0))["color"], color)


def test_compose_repeats_with_the_same_seed():
    pipe = Compose([RandomDropout(0.5, 1), RandomRotate(p=1), RandomScale(), RandomJitter(), ShufflePoint()])
    a = pipe(_scene(), np.random.default_rng(11))
    b = pipe(_scene(), np.random.default_rng(11))
    c = pipe(_scene(), np.random.default_rng(12))
    assert np.array_equal(a["coord"], b["coord"]) and not np.array_equal(a["coord"][:5], c["coord"][:5])

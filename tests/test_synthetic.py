"""Synthetic indoor rooms: determinism, geometric consistency of clouds, boxes and ray-cast frames,
and the on-disk layouts read back through the real-data readers."""

from __future__ import annotations

import argparse
import os

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.spatial import cKDTree

from training.data.classes import (
    DETECTION_CLASS_IDS,
    IGNORE_INDEX,
    NYU40_CEILING,
    NYU40_NAMES,
    NYU40_OTHERPROP,
    SCANNET20_NAMES,
    VALID_CLASS_IDS_20,
    nyu40_to_scannet20,
    scannet20_to_nyu40,
)
from training.data.formats import (
    ALL_FRAMES,
    SCANNET_EVAL_FRAMES,
    SCANNET_TRAIN_FRAMES,
    list_frames,
    load_rgbd_frames,
    load_scene,
    read_skip_list,
    read_split,
)
from training.data.synthetic import SceneConfig, add_generate_arguments, generate_scene, run_generate
from training.data.synthetic.camera import camera_rays, look_pose, scannet_depth_intrinsic
from training.data.synthetic.layout import NYU
from training.data.synthetic.raycast import cast_rays
from training.data.synthetic.shapes import BoxSet, Material, Part, SceneObject, rotate_z
from training.data.synthetic.writer import write_point_scene, write_rgbd_scene

SMALL = SceneConfig(room_x=(3.0, 4.0), room_y=(3.0, 4.0), num_frames=4)
DENSE = SceneConfig(room_x=(3.0, 3.5), room_y=(3.0, 3.5), points_per_m2=20000.0, num_frames=3)


@pytest.fixture(scope="module")
def scene():
    return generate_scene(11, SMALL)


@pytest.fixture(scope="module")
def dense_scene():
    return generate_scene(5, DENSE)


@pytest.fixture(scope="module")
def written(tmp_path_factory, scene):
    root = tmp_path_factory.mktemp("synthetic")
    write_point_scene(root / "train" / "scene0000_00", scene)
    write_rgbd_scene(root / "rgbd" / "scene0000_00", "scene0000_00", scene.frames)
    return root


def _inside_box(points: np.ndarray, box7: np.ndarray, tol: float) -> np.ndarray:
    local = rotate_z(points - box7[:3], -box7[6])
    return (np.abs(local) <= box7[3:6] / 2 + tol).all(axis=1)


def _backproject(depth_mm: np.ndarray, intrinsic: np.ndarray, c2w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """World points (M, 3) of the valid pixels of one depth image and their flat pixel indices."""
    v, u = np.nonzero(depth_mm > 0)
    z = depth_mm[v, u].astype(np.float64) / 1000.0
    cam = np.stack([u, v, np.ones_like(u)], axis=1) @ np.linalg.inv(intrinsic[:3, :3]).T * z[:, None]
    return cam @ c2w[:3, :3].T + c2w[:3, 3], v * depth_mm.shape[1] + u


def test_class_lists():
    # ScanNet-20 is the NYU40 vocabulary at VALID_CLASS_IDS_20 (the official mapping), so the two tables, kept in
    # different packages, must name the same class at every index (but for the official configs' "refridgerator"
    # spelling), and the generator's NYU40 ids must be those of the names it gives its objects.
    assert len(SCANNET20_NAMES) == len(set(SCANNET20_NAMES)) == len(VALID_CLASS_IDS_20) == 20
    official = tuple("refridgerator" if name == "refrigerator" else name for name in NYU40_NAMES)
    assert SCANNET20_NAMES == tuple(official[nyu - 1] for nyu in VALID_CLASS_IDS_20)
    assert len(NYU40_NAMES) == NYU40_OTHERPROP == 40 and NYU40_NAMES[NYU40_CEILING - 1] == "ceiling"
    assert all(NYU40_NAMES[nyu - 1] == name for name, nyu in NYU.items())  # the generator labels what it names
    assert SCANNET20_NAMES.index("wall") == 0 and SCANNET20_NAMES.index("floor") == 1  # not detection classes
    labels = np.arange(-1, 20)
    assert np.array_equal(nyu40_to_scannet20(scannet20_to_nyu40(labels)), labels)
    assert nyu40_to_scannet20(np.array([0, NYU40_CEILING, 40])).tolist() == [IGNORE_INDEX] * 3
    assert DETECTION_CLASS_IDS == tuple(range(2, 20))
    with pytest.raises(ValueError, match="NYU40 ids"):
        nyu40_to_scannet20(np.array([300]))


def test_generation_is_deterministic():
    config = SceneConfig(room_x=(3.0, 4.0), room_y=(3.0, 4.0), num_frames=2, points_per_m2=400.0)
    a, b, c = generate_scene(3, config), generate_scene(3, config), generate_scene(4, config)
    for key in ("coord", "color", "normal", "segment", "instance"):
        assert np.array_equal(getattr(a.points, key), getattr(b.points, key))
    for key in ("depth", "color", "nyu40", "segment", "instance", "pose"):
        assert np.array_equal(getattr(a.frames, key), getattr(b.frames, key))
    assert not np.array_equal(a.room_size, c.room_size)
    # the point density draws from its own stream: the room does not change with it
    d = generate_scene(3, SceneConfig(room_x=(3.0, 4.0), room_y=(3.0, 4.0), num_frames=2, points_per_m2=800.0))
    assert np.array_equal(a.room_size, d.room_size) and np.array_equal(a.boxes.center, d.boxes.center)
    assert np.array_equal(a.frames.depth, d.frames.depth)


def test_pixel_and_pose_conventions():
    """Pixel (u, v) looks along K^-1 (u, v, 1) with integer pixel centres; OpenCV axes."""
    k, w, h = scannet_depth_intrinsic(4)
    assert (w, h) == (160, 120) and k[0, 2] == 79.5 and k[1, 2] == 59.5
    wall = SceneObject(
        "wall", 1, 0, [Part((0.0, 0.0, 0.0), (20.0, 20.0, 1.0), Material((0.5, 0.5, 0.5)))], np.array([0.0, 0.0, 2.5])
    )
    boxes = BoxSet.from_objects([wall])
    origins, dirs = camera_rays(k, np.eye(4), w, h)  # identity pose: camera axes = world axes
    hits = cast_rays(origins, dirs, boxes)
    assert np.allclose(hits.t, 2.0)  # z-depth of the plane z = 2
    u, v = 3, 100
    point = origins[v * w + u] + hits.t[v * w + u] * dirs[v * w + u]
    assert np.allclose(point, [2.0 * (u - k[0, 2]) / k[0, 0], 2.0 * (v - k[1, 2]) / k[1, 1], 2.0])
    assert np.allclose(hits.normal, [0.0, 0.0, -1.0])
    pose = look_pose(np.array([1.0, 2.0, 1.5]), yaw=0.0, pitch=0.0)  # looking along +x, z up
    assert np.allclose(pose[:3, :3], [[0, 0, 1], [-1, 0, 0], [0, -1, 0]]) and np.isclose(
        np.linalg.det(pose[:3, :3]), 1.0
    )


def test_point_cloud_fields(scene):
    p = scene.points
    n = len(p)
    assert 10_000 < n < 400_000
    assert p.coord.dtype == np.float32 and p.color.dtype == np.uint8 and p.normal.dtype == np.float32
    assert p.segment.dtype == np.int64 and p.instance.dtype == np.int64
    assert np.allclose(np.linalg.norm(p.normal, axis=1), 1.0, atol=1e-6)
    assert (p.coord >= -1e-4).all() and (p.coord <= scene.room_size + 1e-4).all()
    assert p.coord[:, 2].min() == pytest.approx(0.0, abs=1e-6)
    labels = np.array([o.label for o in scene.objects])
    assert np.array_equal(p.segment, labels[p.instance])
    assert (p.instance >= 0).all()  # walls and floor carry instance ids too
    floor = p.segment == SCANNET20_NAMES.index("floor")
    assert floor.any() and np.allclose(p.normal[floor], [0.0, 0.0, 1.0])
    walls = p.segment == 0
    assert walls.any() and np.allclose(p.normal[walls][:, 2], 0.0)
    centre = np.append(scene.room_size[:2] / 2, 0.0)  # wall normals point into the room
    assert (np.einsum("ij,ij->i", p.normal[walls][:, :2], (centre - p.coord[walls])[:, :2]) > 0).all()


def test_boxes_contain_their_points(scene):
    for obj in scene.objects:
        pts = scene.points.coord[scene.points.instance == obj.instance]
        assert _inside_box(pts.astype(np.float64), obj.box7(), 1e-4).all(), obj.name
    boxes, labels, instances = scene.detection_boxes()
    assert len(boxes) >= 1 and boxes.shape[1] == 7
    assert set(labels.tolist()) <= set(DETECTION_CLASS_IDS)
    for box, label, inst in zip(boxes, labels, instances, strict=True):
        assert scene.objects[inst].label == label
        assert (box[3:6] > 0).all()


def test_objects_do_not_interpenetrate(scene):
    """Random points inside each part are never inside a part of another (non-shell) object."""
    rng = np.random.default_rng(0)
    shell = {"wall", "floor", "ceiling", "door", "window"}
    solid = [i for i, o in enumerate(scene.objects) if o.name not in shell]
    b = scene.boxes
    for i in solid:
        for part in np.nonzero(b.obj == i)[0]:
            local = (rng.random((200, 3)) * 2 - 1) * (b.half[part] - 1e-3)
            pts = rotate_z(local, b.yaw[part]) + b.center[part]
            for other in np.nonzero(np.isin(b.obj, solid) & (b.obj != i))[0]:
                q = rotate_z(pts - b.center[other], -b.yaw[other])
                assert not (np.abs(q) < b.half[other] - 1e-3).all(axis=1).any(), (
                    scene.objects[i].name,
                    scene.objects[b.obj[other]].name,
                )


def test_frames_labels_consistent(scene):
    f = scene.frames
    views, h, w = f.depth.shape
    assert (views, h, w) == (4, 120, 160) and f.depth.dtype == np.uint16 and f.color.shape == (4, 120, 160, 3)
    assert np.array_equal(f.depth == 0, f.instance < 0) and np.array_equal(f.depth == 0, f.nyu40 == 0)
    assert np.array_equal(f.segment, nyu40_to_scannet20(f.nyu40))
    labels = np.array([o.label for o in scene.objects])
    hit = f.instance >= 0
    assert np.array_equal(f.segment[hit], labels[f.instance[hit]])
    assert hit.mean() > 0.9  # the cameras look into the room
    assert np.allclose(np.linalg.det(f.pose[:, :3, :3]), 1.0)
    assert np.allclose(f.extrinsic @ f.pose, np.eye(4))


def test_depth_pixels_land_on_sampled_surfaces(dense_scene):
    """Every back-projected depth pixel lies on the cloud of the object the pixel shows."""
    s = dense_scene
    f = s.frames
    trees = {i: cKDTree(s.points.coord[s.points.instance == i]) for i in np.unique(s.points.instance)}
    dists = []
    for v in range(len(f.pose)):
        world, flat = _backproject(f.depth[v], f.intrinsic, f.pose[v])
        inst = f.instance[v].reshape(-1)[flat]
        assert set(np.unique(inst)) <= set(trees), "a pixel shows an object with no sampled points"
        for i in np.unique(inst):
            dists.append(trees[i].query(world[inst == i])[0])
    d = np.concatenate(dists)
    assert np.mean(d < 0.01) > 0.99, np.quantile(d, [0.5, 0.99, 1.0])
    assert d.max() < 0.03


def test_colors_agree_between_frames_and_cloud(dense_scene):
    s = dense_scene
    f = s.frames
    tree = cKDTree(s.points.coord)
    world, flat = _backproject(f.depth[0], f.intrinsic, f.pose[0])
    dist, idx = tree.query(world)
    near = dist < 0.005
    diff = np.abs(f.color[0].reshape(-1, 3)[flat][near].astype(int) - s.points.color[idx[near]].astype(int))
    assert np.median(diff) <= 8  # same colour function; noise cells and pattern edges differ locally


def test_cloud_projects_onto_depth(tmp_path, dense_scene):
    """Official convention: points projected with K and the reader's w2c extrinsic (pixel centres
    at integer coordinates) land where the ray-cast depth image shows them. Inverse depth is
    interpolated bilinearly between the 4 pixels around the projection (exact on a plane); a
    quarter-pixel convention error would already raise the median error to about a millimetre."""
    s = dense_scene
    folder = write_rgbd_scene(tmp_path / "rgbd" / "scene0000_00", "scene0000_00", s.frames)
    views = len(s.frames.pose)
    frames = load_rgbd_frames(folder, list(range(views)))
    h, w = frames["depth"].shape[1:]
    for v in range(views):
        k, w2c = frames["intrinsic"][v], frames["extrinsic"][v]
        cam = s.points.coord.astype(np.float64) @ w2c[:3, :3].T + w2c[:3, 3]
        front = cam[:, 2] > 0.05
        cam, inst = cam[front], s.points.instance[front]
        uvw = cam @ k[:3, :3].T
        u, v_ = uvw[:, 0] / uvw[:, 2], uvw[:, 1] / uvw[:, 2]
        u0, v0 = np.floor(u).astype(int), np.floor(v_).astype(int)
        ok = (u0 >= 0) & (u0 < w - 1) & (v0 >= 0) & (v0 < h - 1)
        u, v_, u0, v0, z, inst = u[ok], v_[ok], u0[ok], v0[ok], cam[ok, 2] * 1000.0, inst[ok]
        depth, shown = frames["depth"][v], frames["instance"][v]
        corners = [
            (v0, u0, (1 - (u - u0)) * (1 - (v_ - v0))),
            (v0, u0 + 1, (u - u0) * (1 - (v_ - v0))),
            (v0 + 1, u0, (1 - (u - u0)) * (v_ - v0)),
            (v0 + 1, u0 + 1, (u - u0) * (v_ - v0)),
        ]
        same = np.all([(depth[a, b] > 0) & (shown[a, b] == inst) for a, b, _ in corners], axis=0)
        inv_depth = sum(wt / np.maximum(depth[a, b], 1.0) for a, b, wt in corners)
        err = np.abs(z - 1.0 / inv_depth)[same]
        assert same.mean() > 0.3 and np.mean(err < 2.0) > 0.5
        assert np.median(err[err < 20.0]) < 0.5, np.quantile(err, [0.5, 0.9])


def test_point_layout_round_trip(written, scene):
    folder = written / "train" / "scene0000_00"
    data = load_scene(folder)
    p = scene.points
    for key in ("coord", "color", "normal", "segment", "instance"):
        assert np.array_equal(data[key], getattr(p, key)) and data[key].dtype == getattr(p, key).dtype
    boxes, labels, instances = scene.detection_boxes()
    assert np.array_equal(data["boxes"], boxes) and np.array_equal(data["box_labels"], labels)
    assert np.array_equal(data["box_instances"], instances)
    assert np.array_equal(np.load(folder / "segment20.npy"), p.segment)


def test_rgbd_layout_round_trip(written, scene):
    folder = written / "rgbd" / "scene0000_00"
    f = scene.frames
    assert Image.open(folder / "depth" / "0.png").mode == "I;16"
    assert np.asarray(Image.open(folder / "depth" / "0.png")).dtype == np.uint16
    assert Image.open(folder / "label" / "0.png").mode == "L"
    assert Image.open(folder / "color" / "0.jpg").format == "JPEG"
    assert np.array_equal(np.loadtxt(folder / "pose" / "2.txt"), f.pose[2])
    ids = list_frames(folder, ALL_FRAMES)
    assert ids == [0, 1, 2, 3]
    data = load_rgbd_frames(folder, ids)
    assert data["rgb"].shape == (4, 120, 160, 3) and data["rgb"].dtype == np.uint8
    assert data["depth"].dtype == np.float32 and np.array_equal(data["depth"], f.depth.astype(np.float32))
    assert data["semantic"].dtype == np.int16 and np.array_equal(data["semantic"], f.segment)
    assert np.array_equal(data["instance"], f.instance)
    assert np.array_equal(data["intrinsic"], np.repeat(f.intrinsic[None], 4, axis=0))
    assert np.allclose(data["extrinsic"] @ f.pose, np.eye(4), atol=1e-12)
    assert np.abs(data["rgb"].astype(int) - f.color.astype(int)).mean() < 3.0  # JPEG quality 95
    assert data["depth_scale"] == pytest.approx(1e-3)


def test_frame_selection_rules(tmp_path):
    color = tmp_path / "color"
    color.mkdir()
    for i in range(200):
        (color / f"{i}.jpg").touch()
    assert list_frames(tmp_path, SCANNET_TRAIN_FRAMES) == list(range(40, 140, 10))  # frames[40:-60:10], numeric order
    assert list_frames(tmp_path, SCANNET_EVAL_FRAMES) == []  # every 10th first: 20 frames are too few
    assert list_frames(tmp_path, ALL_FRAMES, skip=[3, 5]) == [i for i in range(200) if i not in (3, 5)]
    (tmp_path / "skip.lst").write_text("scene0000_00 7\nscene0000_00 9\nscene0001_00 1\n")
    assert read_skip_list(tmp_path / "skip.lst") == {"scene0000_00": {7, 9}, "scene0001_00": {1}}


def test_pth_reader_is_safe(tmp_path):
    n = 5
    raw = {
        "coord": np.random.rand(n, 3).astype(np.float32),
        "color": np.random.rand(n, 3) * 255,
        "normal": np.random.rand(n, 3).astype(np.float32),
        "semantic_gt20": np.arange(n),
        "instance_gt": np.arange(n),
        "scene_id": "scene0000_00",
    }
    torch.save(raw, tmp_path / "scene0000_00.pth")
    data = load_scene(tmp_path / "scene0000_00.pth")
    assert np.array_equal(data["coord"], raw["coord"]) and np.array_equal(data["segment"], raw["semantic_gt20"])
    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"coord": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="weights_only"):
        load_scene(tmp_path / "evil.pth")
    assert not marker.exists()


def test_bad_input_is_refused(tmp_path, written):
    with pytest.raises(FileNotFoundError, match="no such scene"):
        load_scene(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no Pointcept"):
        load_scene(tmp_path)
    with pytest.raises(ValueError, match="image_downscale"):
        SceneConfig(image_downscale=3)
    with pytest.raises(ValueError, match="room_x"):
        SceneConfig(room_x=(5.0, 4.0))
    with pytest.raises(FileNotFoundError, match="99.png"):
        load_rgbd_frames(written / "rgbd" / "scene0000_00", [99])
    with pytest.raises(FileNotFoundError, match="no color/"):
        list_frames(tmp_path)


def test_generate_command(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_generate_arguments(parser)
    out = tmp_path / "data"
    args = parser.parse_args(
        [
            "--out",
            str(out),
            "--scenes",
            "2",
            "--frames",
            "2",
            "--points-per-m2",
            "200",
            "--val-fraction",
            "0.5",
            "--quiet",
            "--room-types",
            "office",
        ]
    )
    assert run_generate(args) == 0
    assert read_split(out, "train") == ["scene0000_00"] and read_split(out, "val") == ["scene0001_00"]
    assert len(load_scene(out / "val" / "scene0001_00")["coord"]) > 1000
    assert list_frames(out / "rgbd" / "scene0001_00", ALL_FRAMES) == [0, 1]
    assert run_generate(parser.parse_args(["--out", str(out), "--scenes", "1", "--image-downscale", "3"])) == 2
    assert "image_downscale" in capsys.readouterr().err

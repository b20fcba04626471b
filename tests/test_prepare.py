"""model.prepare (invalid rows, up axis, voxelisation) and model.results (per-point answers at input length)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from model.pointcloud.cloud import PointCloud, PointCloudError
from model.pointcloud.gravity import UP_AXES, estimate_up, named_rotation
from model.prepare import InputOptions, InvalidPointsWarning, prepare, prepare_cloud
from tests.conftest import REPO, fixture_dir, random_room


def test_prepare_imports_no_torch():
    code = "import sys, model.prepare, model.results; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


@pytest.mark.parametrize("up", [a for a in UP_AXES if a != "auto"])
def test_named_axes_are_exact_proper_rotations(up):
    r = named_rotation(up)
    axis = np.zeros(3)
    axis["xyz".index(up[-1])] = -1.0 if up.startswith("-") else 1.0
    np.testing.assert_array_equal(r @ axis, [0, 0, 1])
    assert np.linalg.det(r) == pytest.approx(1.0) and set(np.abs(r).ravel()) == {0.0, 1.0}


def _sensor_frames(count: int, points_per_m2: float):
    """Generated rooms turned into sensor-like frames: y-up, y-down (camera), z-forward, each then tilted by
    10-35 degrees about a random axis and yawed. Yields (coord in the sensor frame, true up there)."""
    from training.data.synthetic import SceneConfig, generate_scene

    bases = [Rotation.from_euler("x", a, degrees=True).as_matrix() for a in (90, -90, 0, 180)]
    for seed in range(count):
        scene = generate_scene(seed, SceneConfig(num_frames=0, points_per_m2=points_per_m2))
        rng = np.random.default_rng(100 + seed)
        axis = rng.normal(size=3)
        tilt = Rotation.from_rotvec(axis / np.linalg.norm(axis) * np.radians(rng.uniform(10, 35))).as_matrix()
        q = tilt @ bases[seed % 4] @ Rotation.from_euler("z", rng.uniform(0, 360), degrees=True).as_matrix()
        yield scene.points.coord @ q.T, q @ np.array([0.0, 0.0, 1.0])


def _angle(a, b) -> float:
    return float(np.degrees(np.arccos(np.clip(a @ b / np.linalg.norm(a) / np.linalg.norm(b), -1, 1))))


def test_auto_up_recovers_gravity_of_rotated_rooms():
    errors = [_angle(estimate_up(coord), up) for coord, up in _sensor_frames(6, 600.0)]
    assert max(errors) < 3.0, errors


@pytest.mark.slow
def test_auto_up_on_twenty_rooms():
    """The figure the README quotes: 20 rooms at full density (python -m pytest -m slow tests/test_prepare.py)."""
    errors = [_angle(estimate_up(coord), up) for coord, up in _sensor_frames(20, 1500.0)]
    print(f"auto up: max {max(errors):.3f} deg, mean {np.mean(errors):.3f} deg")
    assert max(errors) < 3.0, errors


def test_auto_rotation_puts_the_floor_down():
    room = random_room(20000)
    q = Rotation.from_euler("xy", [70, 20], degrees=True).as_matrix()
    cloud = PointCloud(coord=room["coord"] @ q.T, color=room["color"], normal=room["normal"] @ q.T)
    prepared = prepare_cloud(cloud, 0.02, ("color", "normal"), InputOptions(up="auto"))
    assert _angle(prepared.rotation @ (q @ [0, 0, 1.0]), np.array([0, 0, 1.0])) < 1.0


def test_invalid_rows_are_dropped_or_refused():
    room = random_room(3000)
    coord = room["coord"].copy()
    coord[[5, 17]] = np.nan
    coord[40, 2] = np.inf
    cloud = PointCloud(coord=coord, color=room["color"], normal=room["normal"], source="holes")
    with pytest.warns(InvalidPointsWarning, match="dropped 3 of 3000"):
        prepared, voxels = prepare(cloud, 0.02, ("color", "normal"))
    assert prepared.dropped == 3 and prepared.num_input == 3000 and voxels.num_points == 2997
    with pytest.raises(PointCloudError, match="3 of 3000 points have NaN or infinite coordinates"):
        prepare(cloud, 0.02, ("color", "normal"), InputOptions(invalid="error"))
    with pytest.raises(PointCloudError, match="all 2 points"):
        prepare(PointCloud(coord=np.full((2, 3), np.nan)), 0.02, ("color", "normal"))


def test_organised_pcd_keeps_its_shape(tmp_path):
    from model.pointcloud.readers import read_point_cloud

    h, w = 4, 5
    xyz = np.random.default_rng(0).uniform(0, 2, (h * w, 3)).astype(np.float32)
    xyz[[3, 11]] = np.nan
    header = (f"VERSION 0.7\nFIELDS x y z\nSIZE 4 4 4\nTYPE F F F\nCOUNT 1 1 1\nWIDTH {w}\nHEIGHT {h}\n"
              f"VIEWPOINT 0 0 0 1 0 0 0\nPOINTS {h * w}\nDATA binary\n").encode()
    path = tmp_path / "kinect.pcd"
    path.write_bytes(header + xyz.tobytes())
    with pytest.raises(PointCloudError, match="2 of 20 points have NaN"):
        read_point_cloud(path)
    cloud = read_point_cloud(path, keep_invalid=True)
    assert cloud.grid_shape == (h, w)
    with pytest.warns(InvalidPointsWarning):
        prepared = prepare_cloud(cloud, 0.02, ("coord",))
    assert prepared.grid_shape == (h, w) and prepared.dropped == 2


@pytest.fixture(scope="module")
def predictor():
    from model.inference import load_predictor

    return load_predictor(fixture_dir("spunet_v1m1_seg") / "checkpoint.pth")


def test_results_keep_input_length_with_nan_and_minus_one(predictor):
    room = random_room(4000, seed=3)
    coord = room["coord"].copy()
    coord[[0, 100, 3999]] = np.nan
    cloud = PointCloud(coord=coord, color=room["color"], normal=room["normal"])
    with pytest.warns(InvalidPointsWarning):
        result = predictor.segment(cloud)
        features = predictor.features(cloud)
    bad = np.zeros(4000, bool)
    bad[[0, 100, 3999]] = True
    assert result.labels.shape == (4000,) and (result.labels[bad] == -1).all() and (result.labels[~bad] >= 0).all()
    assert np.isnan(result.logits[bad]).all() and np.isfinite(result.logits[~bad]).all()
    point_features = features.point_features()
    assert np.isnan(point_features[bad]).all() and np.isfinite(point_features[~bad]).all()
    clean = PointCloud(coord=room["coord"][~bad], color=room["color"][~bad], normal=room["normal"][~bad])
    np.testing.assert_array_equal(result.labels[~bad], predictor.segment(clean).labels)


def test_segmenting_a_y_up_room_with_up_y_equals_the_z_up_result(predictor):
    room = random_room(4000, seed=5)
    r = named_rotation("y")
    y_up = PointCloud(coord=room["coord"] @ r, color=room["color"], normal=room["normal"] @ r)  # R^T: z → y
    assert np.abs(y_up.coord[:, 1] - room["coord"][:, 2]).max() == 0
    original = predictor.segment(PointCloud(**room))
    rotated = predictor.segment(y_up, options=InputOptions(up="y"))
    np.testing.assert_array_equal(rotated.labels, original.labels)
    np.testing.assert_allclose(rotated.logits, original.logits, atol=1e-5)
    np.testing.assert_array_equal(rotated.prepared.rotation, r)

"""PCA normals against analytic surfaces, the orientation rule, fallbacks, and fill_missing."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from model.pointcloud.cloud import PointCloud, PointCloudError
from model.pointcloud.normals import FILL_COLOR, MissingFieldWarning, estimate_normals, fill_missing


def _angle_deg(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    cos = np.einsum("ij,ij->i", a, b) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def test_tilted_plane_normals_face_the_viewpoint() -> None:
    rng = np.random.default_rng(0)
    truth = _unit(np.array([0.3, -0.2, 1.0]))
    u = _unit(np.cross(truth, [1.0, 0.0, 0.0]))
    v = np.cross(truth, u)
    st = rng.uniform(-2, 2, (5000, 2))
    points = st[:, :1] * u + st[:, 1:] * v + rng.normal(scale=1e-3, size=(5000, 1)) * truth + [1.0, 2.0, 0.5]
    for viewpoint, expected in (([1.0, 2.0, 5.0], truth), ([1.0, 2.0, -5.0], -truth)):
        normals = estimate_normals(points.astype(np.float32), k=16, viewpoint=np.array(viewpoint))
        assert normals.dtype == np.float32 and normals.shape == (5000, 3)
        np.testing.assert_allclose(np.linalg.norm(normals, axis=1), 1.0, atol=1e-5)
        assert np.percentile(_angle_deg(normals, np.broadcast_to(expected, normals.shape)), 99) < 3.0


def test_sphere_normals_are_radial_and_point_to_the_centre() -> None:
    rng = np.random.default_rng(1)
    centre = np.array([1.0, -2.0, 3.0])
    radial = _unit(rng.normal(size=(20000, 3)))
    points = (centre + 2.0 * radial).astype(np.float32)
    normals = estimate_normals(points)  # default viewpoint: bounding-box centre ≈ sphere centre
    angles = _angle_deg(normals, -radial)
    assert np.percentile(angles, 99) < 3.0
    assert angles.max() < 10.0  # every normal oriented inwards, none flipped


def test_room_normals_point_into_the_room() -> None:
    """Floor up, ceiling down, walls inwards: the ScanNet mesh-normal convention."""
    rng = np.random.default_rng(2)
    size = np.array([6.0, 4.0, 3.0])
    faces, truths = [], []
    for axis in range(3):
        for side, inward in ((0.0, 1.0), (size[axis], -1.0)):
            pts = rng.uniform(0, 1, (6000, 3)) * size
            pts[:, axis] = side
            faces.append(pts)
            truths.append(np.broadcast_to(np.eye(3)[axis] * inward, pts.shape))
    points, truth = np.concatenate(faces), np.concatenate(truths)
    normals = estimate_normals(points.astype(np.float32))
    # Away from the edges (where neighbourhoods straddle two faces) every normal is right.
    interior = np.all((points > 0.2) | (np.eye(3)[np.argmax(np.abs(truth), axis=1)] == 1), axis=1)
    interior &= np.all((points < size - 0.2) | (np.eye(3)[np.argmax(np.abs(truth), axis=1)] == 1), axis=1)
    assert interior.sum() > 20000
    assert _angle_deg(normals[interior], truth[interior]).max() < 5.0


def test_result_does_not_depend_on_point_order() -> None:
    rng = np.random.default_rng(3)
    points = rng.uniform(-1, 1, (3000, 3)).astype(np.float32)
    normals = estimate_normals(points)
    order = rng.permutation(len(points))
    np.testing.assert_array_equal(estimate_normals(points[order]), normals[order])


@pytest.mark.parametrize("points", [
    np.zeros((0, 3)),
    np.array([[0.0, 0.0, 0.0]]),
    np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]),
    np.tile([[1.0, 2.0, 3.0]], (50, 1)),  # coincident
    np.outer(np.linspace(0, 1, 50), [1.0, 1.0, 0.0]),  # collinear
])
def test_degenerate_input_falls_back_to_up(points: np.ndarray) -> None:
    normals = estimate_normals(points)
    assert normals.shape == points.shape and np.isfinite(normals).all()
    np.testing.assert_array_equal(normals, np.tile([0.0, 0.0, 1.0], (len(points), 1)))


def test_bad_input_is_refused() -> None:
    with pytest.raises(PointCloudError, match="NaN or infinite"):
        estimate_normals(np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [np.nan, 0, 0]], dtype=np.float32))
    with pytest.raises(PointCloudError, match="shape"):
        estimate_normals(np.zeros((10, 2)))
    with pytest.raises(ValueError, match="k must be at least 3"):
        estimate_normals(np.zeros((10, 3)), k=2)


def test_fill_missing_estimates_normals_and_greys_colours_with_warnings() -> None:
    rng = np.random.default_rng(4)
    cloud = PointCloud(coord=rng.uniform(0, 1, (500, 3)), extras={"label": np.arange(500)}, source="scan.xyz")
    with pytest.warns(MissingFieldWarning) as record:
        filled = fill_missing(cloud)
    messages = [str(w.message) for w in record]
    assert any("scan.xyz" in m and "normals" in m for m in messages)
    assert any("scan.xyz" in m and "colours" in m for m in messages)
    assert filled is not cloud and cloud.normal is None and cloud.color is None  # input untouched
    np.testing.assert_array_equal(filled.normal, estimate_normals(cloud.coord))
    assert filled.color.dtype == np.uint8 and (filled.color == FILL_COLOR).all()
    assert abs(FILL_COLOR / 127.5 - 1) < 0.01  # ≈ 0 after the model's colour normalisation
    np.testing.assert_array_equal(filled.extras["label"], cloud.extras["label"])
    filled.extras["new"] = np.zeros(500)
    assert "new" not in cloud.extras


def test_fill_missing_keeps_existing_fields_silently() -> None:
    rng = np.random.default_rng(5)
    cloud = PointCloud(
        coord=rng.uniform(0, 1, (100, 3)),
        color=rng.integers(0, 256, (100, 3), dtype=np.uint8),
        normal=np.tile([1.0, 0.0, 0.0], (100, 1)),
        source="full.ply",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        filled = fill_missing(cloud)
    np.testing.assert_array_equal(filled.color, cloud.color)
    np.testing.assert_array_equal(filled.normal, cloud.normal)


def test_one_million_points() -> None:
    """1M points in chunks: finishes (about 10 s on 2 cores) with finite unit normals."""
    points = np.random.default_rng(6).uniform(-5, 5, (1_000_000, 3)).astype(np.float32)
    normals = estimate_normals(points)
    assert normals.shape == (1_000_000, 3) and normals.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(normals, axis=1), 1.0, atol=1e-5)

"""The official input pipeline: grid sampling, feature assembly and the point→voxel map."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import fixture_dir, random_room
from model.pointcloud.cloud import PointCloud, PointCloudError
from model.pointcloud.voxelize import fnv_hash, voxelize


def test_pipeline_reproduces_the_official_network_input():
    folder = fixture_dir("spunet_v1m1_seg")
    inp, expected = np.load(folder / "input.npz"), np.load(folder / "expected.npz")
    voxels = voxelize(PointCloud(inp["coord"], inp["color"], inp["normal"]))
    # network row i is input point fnv_order[i]: the official row order
    np.testing.assert_array_equal(voxels.point_to_voxel[expected["fnv_order"]], np.arange(voxels.num_voxels))
    np.testing.assert_array_equal(voxels.grid_coord[voxels.point_to_voxel], expected["grid_coord"])
    np.testing.assert_array_equal(voxels.feat[voxels.point_to_voxel], expected["feat"])


def test_fnv_hash_is_fnv1_64():
    # FNV-1 of the three "bytes" 1, 2, 3 fed as whole words: multiply then xor, modulo 2**64
    expected = 14695981039346656037
    for value in (1, 2, 3):
        expected = ((expected * 1099511628211) % 2**64) ^ value
    assert int(fnv_hash(np.array([[1, 2, 3]]))[0]) == expected


def test_points_sharing_a_voxel_get_its_row_and_order_does_not_matter():
    # the fixture scene has one point per voxel, each >= 2 mm from the voxel faces; copies moved by
    # < 0.5 mm stay in their voxel even though the centre shift may move by 0.5 mm
    inp = np.load(fixture_dir("spunet_v1m1_seg") / "input.npz")
    rng = np.random.default_rng(0)
    base = inp["coord"]
    coord = np.concatenate([base, base + rng.uniform(-5e-4, 5e-4, base.shape).astype(np.float32)])
    color = np.concatenate([inp["color"], 255 - inp["color"]])  # copies get other colours
    normal = np.concatenate([inp["normal"]] * 2)
    voxels = voxelize(PointCloud(coord, color, normal))
    n = len(base)
    assert voxels.num_voxels == n
    np.testing.assert_array_equal(voxels.point_to_voxel[:n], voxels.point_to_voxel[n:])
    # the first point of a voxel (input order) is the one kept
    kept_color = voxels.feat[voxels.point_to_voxel[:n], :3]
    np.testing.assert_array_equal(kept_color, inp["color"].astype(np.float32) / 127.5 - 1)

    perm = rng.permutation(len(coord))
    shuffled = voxelize(PointCloud(coord[perm], color[perm], normal[perm]))
    np.testing.assert_array_equal(shuffled.grid_coord[shuffled.point_to_voxel],
                                  voxels.grid_coord[voxels.point_to_voxel][perm])
    assert shuffled.num_voxels == n


@pytest.mark.parametrize("coord,message", [
    (np.zeros((0, 3), np.float32), "no points"),
    (np.array([[0, 0, 0], [np.nan, 1, 1]], np.float32), "NaN or infinite"),
    (np.array([[0, 0, 0], [np.inf, 1, 1]], np.float32), "NaN or infinite"),
])
def test_bad_coordinates_are_refused(coord, message):
    cloud = PointCloud(coord, np.zeros((len(coord), 3), np.uint8), np.zeros((len(coord), 3), np.float32),
                       source="scan.ply")
    with pytest.raises(PointCloudError, match=f"scan.ply: .*{message}"):
        voxelize(cloud)


def test_bad_grid_size_and_absurd_units_are_refused():
    room = random_room(1000)
    cloud = PointCloud(room["coord"], room["color"], room["normal"], source="room.npz")
    with pytest.raises(PointCloudError, match="grid_size"):
        voxelize(cloud, grid_size=0)
    huge = PointCloud(room["coord"] * 1e6, room["color"], room["normal"], source="mm.npz")
    with pytest.raises(PointCloudError, match="units"):
        voxelize(huge)


def test_precise_mode_covers_every_point_and_agrees_with_fast_mode_mostly():
    from model.inference import load_predictor
    from model.tta import OFFICIAL_AUGMENTATIONS, Augmentation, fragment_inputs, precise_probabilities

    folder = fixture_dir("spunet_v1m1_seg")
    inp = np.load(folder / "input.npz")
    # two points per voxel: fragments must cover both
    coord = np.concatenate([inp["coord"], inp["coord"] + 1e-4]).astype(np.float32)
    cloud = PointCloud(coord, np.concatenate([inp["color"]] * 2), np.concatenate([inp["normal"]] * 2))
    pieces = list(fragment_inputs(cloud, 0.02, ("color", "normal")))
    assert len(pieces) >= 2 * len(OFFICIAL_AUGMENTATIONS)
    covered = np.zeros(len(coord), bool)
    for kept, _ in pieces[:2]:  # the two fragments of the identity augmentation
        covered[kept] = True
    assert covered.all()

    predictor = load_predictor(folder / "checkpoint.pth")
    small = PointCloud(inp["coord"][:4000], inp["color"][:4000], inp["normal"][:4000])
    fast = predictor.segment(small)
    precise = predictor.segment(small, precise=True)
    assert precise.logits.shape == fast.logits.shape
    np.testing.assert_allclose(np.exp(precise.logits).sum(1), 1, atol=1e-4)
    # with the identity augmentation alone, the voted probabilities are the softmax of the fast logits
    # (the whole fixture scene has one point per voxel, so a single fragment)
    whole = PointCloud(inp["coord"], inp["color"], inp["normal"])
    identity = precise_probabilities(predictor, whole, None, augmentations=(Augmentation(),))
    logits = predictor.segment(whole).logits
    expected = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(identity, expected / expected.sum(1, keepdims=True), atol=1e-5)


def test_augmentations_rotate_scale_and_flip_about_the_origin():
    from model.tta import Augmentation

    point, normal = np.array([[1.0, 0.0, 0.5]], np.float32), np.array([[1.0, 0.0, 0.0]], np.float32)
    c, n = Augmentation(angle=0.5, scale=1.05).apply(point, normal)
    np.testing.assert_allclose(c, [[0.0, 1.05, 0.525]], atol=1e-6)
    np.testing.assert_allclose(n, [[0.0, 1.0, 0.0]], atol=1e-6)
    c, n = Augmentation(flip=True).apply(point, normal)
    np.testing.assert_allclose(c, [[-1.0, 0.0, 0.5]])
    np.testing.assert_allclose(n, [[-1.0, 0.0, 0.0]])

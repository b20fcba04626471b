"""The image segmentation head's geometry, checked by hand: voxel targets from labelled points (majority label,
empty where seen and no point, ignored where unseen), pixel labels by marching each pixel's ray to the first
occupied voxel, and the saved model folder round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.images import ImageModelConfig
from model.images.checkpoint import save_image_model
from model.images.segment import (IGNORE, ImageSegmentModel, grid_coordinates, load_image_segment_model,
                                  pixel_labels, segment_config_from, voxel_targets)
from model.images.volume import cube_from_bounds, unit_to_world, voxel_centres_unit
from model.render.cameras import Camera

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py
GRID = (8, 8, 4)
PAD = 0.1
BOUNDS = np.array([[0.0, 0.0, 0.0], [4.0, 4.0, 2.0]])


def setup():
    cube = cube_from_bounds(torch.tensor(BOUNDS, dtype=torch.float32))
    centres = unit_to_world(cube, voxel_centres_unit(GRID, PAD))  # (Z·Y·X, 3), x fastest
    return cube, centres


def test_voxel_centres_map_back_to_their_integer_indices():
    cube, centres = setup()
    idx = grid_coordinates(cube, centres, GRID, PAD)
    z, y, x = torch.meshgrid(torch.arange(GRID[2]), torch.arange(GRID[1]), torch.arange(GRID[0]), indexing="ij")
    expected = torch.stack([x, y, z], -1).reshape(-1, 3).float()
    torch.testing.assert_close(idx, expected, atol=1e-4, rtol=0)


def test_voxel_targets_majority_empty_and_ignored():
    cube, centres = setup()
    flat = lambda x, y, z: z * GRID[1] * GRID[0] + y * GRID[0] + x  # noqa: E731
    a, b, c = flat(1, 2, 0), flat(5, 5, 3), flat(7, 0, 1)
    jitter = torch.tensor([0.05, -0.04, 0.03])
    points = torch.stack([centres[a], centres[a] + jitter, centres[a] - jitter, centres[b], centres[c]])
    labels = torch.tensor([3, 3, 9, 4, -1])  # voxel a: majority 3; b: 4; c: only an unlabelled point
    count = torch.ones(GRID[2], GRID[1], GRID[0], dtype=torch.long)
    count.view(-1)[flat(0, 0, 0)] = 0  # a voxel no view sees
    target = voxel_targets(points, labels, cube, GRID, PAD, count, num_classes=10)
    assert target[a] == 3 and target[b] == 4
    assert target[c] == IGNORE  # occupied, but no usable label
    assert target[flat(0, 0, 0)] == IGNORE  # unseen
    others = torch.ones_like(target, dtype=torch.bool)
    others[[a, b, c, flat(0, 0, 0)]] = False
    assert (target[others] == 10).all()  # seen and empty


def test_pixel_labels_march_to_the_first_occupied_voxel():
    """A floor slab (voxel layer z = 1) labelled 5 for x < 4 and 7 for x >= 4, seen from above: every pixel
    whose ray meets the slab takes the label of the voxel column it meets; pixels looking past the box get -1."""
    cube, centres = setup()
    occupancy = torch.zeros(GRID[2], GRID[1], GRID[0])
    occupancy[1] = 1.0
    labels = torch.full((GRID[2], GRID[1], GRID[0]), -1, dtype=torch.long)
    labels[1, :, :4] = 5
    labels[1, :, 4:] = 7
    w, h, f = 48, 36, 30.0
    eye = np.array([2.0, 2.0, 6.0])
    c2w = np.eye(4)
    c2w[:3, :3] = np.array([[1.0, 0, 0], [0, -1.0, 0], [0, 0, -1.0]])  # x right, y down (-y world), looking down
    c2w[:3, 3] = eye
    cam = Camera(K=np.array([[f, 0, (w - 1) / 2], [0, f, (h - 1) / 2], [0, 0, 1]]), w2c=np.linalg.inv(c2w),
                 width=w, height=h)
    got = pixel_labels(occupancy, labels, cube, [cam], GRID, PAD, BOUNDS)[0]
    # Hand projection: the slab's top (occupancy 0.5 half a voxel above the layer's centre) along each pixel ray.
    layer_z = float(centres[1 * GRID[1] * GRID[0], 2])
    step_z = float(centres[GRID[1] * GRID[0], 2] - centres[0, 2])
    lo = unit_to_world(cube, torch.tensor([[-0.5, -0.5, -0.5]]) * (1 + PAD + 1e-3))[0].numpy()
    hi = unit_to_world(cube, torch.tensor([[0.5, 0.5, 0.5]]) * (1 + PAD + 1e-3))[0].numpy()
    x_split = float(centres[4, 0] + centres[3, 0]) / 2
    u, v = np.meshgrid(np.arange(w), np.arange(h))
    depth = eye[2] - (layer_z + step_z / 2)  # camera z of the slab's top face
    x = eye[0] + (u - (w - 1) / 2) / f * depth
    y = eye[1] - (v - (h - 1) / 2) / f * depth
    inside = (x > lo[0] + 0.2) & (x < hi[0] - 0.2) & (y > lo[1] + 0.2) & (y < hi[1] - 0.2)
    clear = inside & (np.abs(x - x_split) > 0.15)
    expected = np.where(x < x_split, 5, 7)
    assert clear.sum() > 200
    np.testing.assert_array_equal(got[clear], expected[clear])
    outside = (x < lo[0] - 0.6) | (x > hi[0] + 0.6) | (y < lo[1] - 0.6) | (y > hi[1] + 0.6)
    assert outside.sum() > 50 and (got[outside] == -1).all()
    # Marching every 3rd row and column (max_rays): pixels take the nearest marched pixel's label, so away from
    # the edges (more than a stride, 0.55 m here) the labels are the same.
    sparse = pixel_labels(occupancy, labels, cube, [cam], GRID, PAD, BOUNDS, max_rays=200)[0]
    far = inside & (np.abs(x - x_split) > 0.7) & (x > lo[0] + 0.7) & (x < hi[0] - 0.7) & (y > lo[1] + 0.7) \
        & (y < hi[1] - 0.7)
    assert far.sum() > 50
    np.testing.assert_array_equal(sparse[far], expected[far])
    far_out = (x < lo[0] - 0.8) | (x > hi[0] + 0.8) | (y < lo[1] - 0.8) | (y > hi[1] + 0.8)
    assert far_out.sum() > 20 and (sparse[far_out] == -1).all()


def test_segment_model_folder_round_trip(tmp_path):
    torch.manual_seed(0)
    tiny = {"backbone": {"width": 8}, "lift": {"dim": 4},
            "render": {"projection": {"out_channels": 8, "f_maps": [8, 16]}, "field": {"hidden_size": 16, "geo_dim": 8},
                       "grid_shape": [8, 8, 4]}}
    model = ImageSegmentModel(segment_config_from(ImageModelConfig.from_dict(tiny), ["a", "b"]))
    loaded = load_image_segment_model(save_image_model(model, tmp_path / "seg"))
    assert loaded.cfg.class_names == ("a", "b") and loaded.classifier.out_channels == 3
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value)
    with pytest.raises(FileNotFoundError, match="not an image segmentation model folder"):
        load_image_segment_model(tmp_path)

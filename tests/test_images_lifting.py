"""Lifting image features into voxels: a point seen by two views gets exactly the pixels a hand-made pinhole
projection gives, hidden views are masked out of the mean, and the voxel grid sits where the SDF field reads it."""

from __future__ import annotations

import pytest
import torch

from model.images import ImageModelConfig, ImageRenderModel, fuse_mean, lift_views, project, sample_maps, visible
from model.images.volume import cube_from_bounds, unit_to_world, voxel_centres_unit
from model.render.field import normalize_3d_coordinate

W, H = 8, 6
POINT = torch.tensor([[0.1, 0.1, 2.0]])


def two_cameras() -> tuple[torch.Tensor, torch.Tensor]:
    """View 0 at the origin looking along +z; view 1 two metres to the point's +x side looking along -x.
    By hand: view 0 sees (0.1, 0.1, 2) at u = 10·0.1/2 + 3.5 = 4, v = 10·0.1/2 + 2.5 = 3; view 1 has it on its
    optical axis at depth 2, i.e. at its principal point (3, 2)."""
    K = torch.tensor([[[10.0, 0, 3.5], [0, 10.0, 2.5], [0, 0, 1]], [[12.0, 0, 3.0], [0, 12.0, 2.0], [0, 0, 1]]])
    c2w1 = torch.eye(4)
    c2w1[:3, :3] = torch.tensor([[0.0, 0, -1], [0, 1, 0], [1, 0, 0]])  # columns: camera x, y, z in the world
    c2w1[:3, 3] = torch.tensor([2.1, 0.1, 2.0])
    return K, torch.stack([torch.eye(4), torch.linalg.inv(c2w1)])


def test_projection_matches_the_hand_made_one():
    K, w2c = two_cameras()
    uv, z = project(POINT, K, w2c)
    assert torch.allclose(uv[:, 0], torch.tensor([[4.0, 3.0], [3.0, 2.0]]), atol=1e-5)
    assert torch.allclose(z[:, 0], torch.tensor([2.0, 2.0]), atol=1e-6)
    assert visible(uv, z, W, H).all()


def test_a_point_seen_in_two_views_gets_their_pixels_and_their_mean():
    K, w2c = two_cameras()
    maps = torch.rand(2, 5, H, W, generator=torch.Generator().manual_seed(0))  # stride 1: features = pixels
    uv, _ = project(POINT, K, w2c)
    got = sample_maps(maps, uv, stride=1)[:, 0]  # (V, C)
    assert torch.allclose(got[0], maps[0, :, 3, 4], atol=1e-6)  # view 0 row v=3, column u=4
    assert torch.allclose(got[1], maps[1, :, 2, 3], atol=1e-6)
    fused = lift_views([maps], [1], POINT, K, w2c, W, H)
    pixels = torch.stack([maps[0, :, 3, 4], maps[1, :, 2, 3]])
    assert fused.count.tolist() == [2]
    assert torch.allclose(fused.mean[0], pixels.mean(0), atol=1e-6)
    assert torch.allclose(fused.variance[0], pixels.var(0, unbiased=False), atol=1e-6)


def test_strided_maps_use_the_pixel_centre_convention():
    """A stride-2 map of a 8x6 image: pixel (4, 3) is at map coordinate ((4 + .5)/2 - .5, (3 + .5)/2 - .5) =
    (1.75, 1.25): the bilinear mix of map cells (1..2, 1..2) by hand."""
    K, w2c = two_cameras()
    maps = torch.rand(2, 3, H // 2, W // 2, generator=torch.Generator().manual_seed(1))
    uv, _ = project(POINT, K, w2c)
    m = maps[0]
    by_hand = (m[:, 1, 1] * 0.25 * 0.75 + m[:, 1, 2] * 0.75 * 0.75 + m[:, 2, 1] * 0.25 * 0.25
               + m[:, 2, 2] * 0.75 * 0.25)
    assert torch.allclose(sample_maps(maps, uv, stride=2)[0, 0], by_hand, atol=1e-6)


def test_views_that_do_not_see_a_point_are_masked_out():
    K, w2c = two_cameras()
    behind = torch.tensor([[0.1, 0.1, -2.0]])  # behind view 0; in front of view 1 but far outside its image
    uv, z = project(behind, K, w2c)
    assert not visible(uv, z, W, H).any()
    maps = torch.rand(2, 4, H, W)
    fused = lift_views([maps], [1], torch.cat([POINT, behind]), K, w2c, W, H)
    assert fused.count.tolist() == [2, 0]
    assert torch.equal(fused.mean[1], torch.zeros(4)) and torch.equal(fused.variance[1], torch.zeros(4))
    only0 = fuse_mean(sample_maps(maps, project(POINT, K, w2c)[0], 1), torch.tensor([[True], [False]]))
    assert torch.allclose(only0.mean[0], maps[0, :, 3, 4], atol=1e-6) and only0.count.tolist() == [1]


def test_voxel_centres_sit_on_the_fields_grid_points():
    shape = (6, 5, 4)
    unit = voxel_centres_unit(shape, 0.1)
    index = normalize_3d_coordinate(unit, 0.1) * (torch.tensor(shape, dtype=torch.float32) - 1)
    z, y, x = torch.meshgrid(torch.arange(4), torch.arange(5), torch.arange(6), indexing="ij")
    # exact, except that the field clamps the last grid point to 0.999 of the axis (its QUIRK): 5·0.001 off
    assert torch.allclose(index, torch.stack([x, y, z], -1).reshape(-1, 3).float(), atol=6e-3)
    bounds = torch.tensor([[-1.0, 0.0, 0.0], [3.0, 2.0, 2.5]])
    cube = cube_from_bounds(bounds)
    back = unit_to_world(cube, torch.tensor([[0.0, 0.0, -0.5]]))  # the floor centre of the unit cube
    assert torch.allclose(back, torch.tensor([[1.0, 1.0, 0.0]]), atol=1e-4)


def test_model_lifts_into_the_documented_shapes():
    torch.manual_seed(0)
    cfg = ImageModelConfig.from_dict({"backbone": {"width": 8}, "lift": {"dim": 4},
                                      "render": {"projection": {"out_channels": 8, "f_maps": [8, 16]},
                                                 "field": {"hidden_size": 16, "geo_dim": 8}, "grid_shape": [8, 6, 4]}})
    model = ImageRenderModel(cfg).eval()
    K, w2c = two_cameras()
    images = torch.rand(1, 2, 3, 32, 48)
    K = K.clone()
    K[:, 0, 2], K[:, 1, 2] = 23.5, 15.5
    bounds = torch.tensor([[[-0.5, -0.5, 1.5], [0.7, 0.7, 2.5]]])
    with torch.no_grad():
        volume, lifted = model(images, K[None], w2c[None], bounds)
    assert lifted.volume.shape == (1, cfg.lifted_channels, 4, 6, 8) and cfg.lifted_channels == 9
    assert volume.shape == (1, 8, 4, 6, 8)
    uv, z = project(lifted.centres[0], K, w2c)
    assert torch.equal(lifted.count[0].reshape(-1), visible(uv, z, 48, 32).sum(0))
    coverage = lifted.volume[0, -1].reshape(-1)
    assert torch.allclose(coverage, lifted.count[0].reshape(-1).float() / 2)
    with pytest.raises(ValueError, match="bounds"):
        model(images, K[None], w2c[None], bounds[0])

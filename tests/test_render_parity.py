"""Parity of model.render with the official PonderIndoor-v2 render path (fixture ``ponder_render``), the
checkpoint layouts of both eras, and the novel-view camera API."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import KEYS, fixture_dir
from model.render import (Camera, CameraError, PonderRenderHead, RenderConfigError, RenderHeadConfig,
                          cameras_from_json, cameras_from_transforms, get_rays, grid_resolution, head_state_dict,
                          infer_head_config, legacy_field_config, normalize_3d_coordinate, render_views,
                          to_dense, to_unit_cube, total_loss)
from model.render.rays import TrainingRays
from model.render.trilinear import GridVolume

TOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"reference data not found: {path}")
    return path


@pytest.fixture(scope="module")
def fx():
    base = fixture_dir("ponder_render")
    cfg = RenderHeadConfig.from_official(json.loads((base / "model_config.json").read_text()))
    ckpt = torch.load(base / "checkpoint.pth", weights_only=True)
    head = PonderRenderHead(cfg)
    head.load_state_dict(head_state_dict(ckpt["state_dict"]), strict=True)
    head.eval()
    load = lambda name: dict(np.load(base / name, allow_pickle=False))  # noqa: E731
    ex, cam, inp = load("expected.npz"), load("cameras.npz"), load("input.npz")
    # The data pipeline up to the model (README steps 2-4): CenterShift(z), GridSample (fnv reorder),
    # CenterShift(no z). Network row i = input point fnv_order[i].
    order = ex["fnv_order"].astype(np.int64)
    coord, shift1 = _center_shift(inp["coord"].astype(np.float32), apply_z=True)
    coord, shift2 = _center_shift(coord[order], apply_z=False)
    return dict(cfg=cfg, head=head, sd=ckpt["state_dict"], ex=ex, cam=cam, order=order, coord=coord,
                shift=shift1.astype(np.float64) + shift2.astype(np.float64))


def _center_shift(coord: np.ndarray, apply_z: bool) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = coord.min(axis=0), coord.max(axis=0)
    shift = np.array([(lo[0] + hi[0]) / 2, (lo[1] + hi[1]) / 2, lo[2] if apply_z else 0], dtype=np.float32)
    return coord - shift, shift


def _maxabs(a, b) -> float:
    a = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    return float(np.abs(a.astype(np.float64) - np.asarray(b, dtype=np.float64)).max())


def _fixture_rays(fx) -> tuple[torch.Tensor, torch.Tensor]:
    cam, ex = fx["cam"], fx["ex"]
    h, w = (int(v) for v in cam["image_hw"])
    rays = [get_rays(h, w, torch.from_numpy(cam["intrinsic"][i][:3, :3]),
                     torch.from_numpy(ex["extrinsic_unit_cube"][i])) for i in range(len(cam["intrinsic"]))]
    idx = zip(cam["cam_index"], cam["pixel_y"], cam["pixel_x"])
    o, d = zip(*[(rays[c][0][y, x], rays[c][1][y, x]) for c, y, x in idx])
    return torch.stack(o), torch.stack(d)


# ---------------------------------------------------------------- checkpoint layouts


def _tsv_head(path: Path) -> list[tuple[str, tuple[int, ...]]]:
    rows = []
    for line in _require(path).read_text().splitlines()[1:]:
        key, shape, _ = line.split("\t")
        key = key.removeprefix("module.")
        if key.startswith(("proj_net.", "renderer.")):
            rows.append((key, () if shape == "scalar" else tuple(int(s) for s in shape.split("x"))))
    return rows


@pytest.mark.parametrize("tsv, legacy", [("pretrain-ponder-ppt-v1m1-0-sc-s3-st-spunet.tsv", False),
                                         ("pretrain-ponder-ppt-v1m1-0-sc-s3-st-spunet.70e8ead.tsv", True)])
def test_state_dict_layout_matches_official_listing(tsv, legacy):
    cfg = RenderHeadConfig(field=legacy_field_config(128)) if legacy else RenderHeadConfig()
    head = PonderRenderHead(cfg)
    got = [(k, tuple(v.shape)) for k, v in head.state_dict().items()]
    expected = _tsv_head(KEYS / tsv)
    assert got == expected  # names, shapes and order
    inferred = infer_head_config({k: torch.zeros(s) for k, s in expected})
    assert inferred == cfg
    assert inferred.field.share_volume is legacy and inferred.field.norm_pts is not legacy
    assert inferred.field.sdf_decoder.points_factor == (1.0 if legacy else 0.0)


def test_fixture_checkpoint_loads_strict_and_config_is_inferred(fx):
    head_sd = head_state_dict(fx["sd"])
    assert list(head_sd) == list(fx["head"].state_dict())
    assert infer_head_config(head_sd, grid_shape=(24, 24, 16), ray_nsample=256) == fx["cfg"]
    assert RenderHeadConfig.from_dict(fx["cfg"].to_dict()) == fx["cfg"]
    broken = dict(head_sd)
    broken["renderer.field.sdf_decoder.fc_c.0.weight"] = torch.zeros(16, 5)
    with pytest.raises(RenderConfigError, match="sdf_decoder"):
        infer_head_config(broken)


# ---------------------------------------------------------------- unit cube, dense volume, projection


def test_unit_cube_matches_fixture(fx):
    ex = fx["ex"]
    scene = to_unit_cube(torch.from_numpy(fx["coord"]))
    inverse = np.empty_like(fx["order"])
    inverse[fx["order"]] = np.arange(len(fx["order"]))
    assert _maxabs(scene.coord[torch.from_numpy(inverse)], ex["coord_after_unit_cube"]) <= TOL  # input order
    assert _maxabs(scene.cube.extent, ex["pc_scale"][0]) == 0.0
    assert _maxabs(scene.bbox, ex["bbox_after_unit_cube"][0]) <= TOL
    assert _maxabs(scene.cube.scale * torch.tensor(0.001), ex["depth_scale_after"][0]) <= 1e-9
    w2c = scene.cube.transform_extrinsics(torch.from_numpy(ex["extrinsic_after_pipeline"]))
    assert _maxabs(w2c, ex["extrinsic_unit_cube"]) <= TOL
    assert scene.points.min() >= -0.5 and scene.points.max() <= 0.5
    bbox_grid, resolution = grid_resolution(scene.bbox[None], 0.02)
    assert np.array_equal(bbox_grid.numpy(), ex["bbox_grid"]) and np.array_equal(resolution.numpy(), ex["resolution"])


def test_dense_volume_and_projection_match_fixture(fx):
    ex, cfg, head = fx["ex"], fx["cfg"], fx["head"]
    feat = torch.from_numpy(ex["backbone_feat"])[torch.from_numpy(fx["order"])]  # network order
    scene = to_unit_cube(torch.from_numpy(fx["coord"]))
    _, resolution = grid_resolution(scene.bbox[None], cfg.grid_size)
    dense = to_dense(scene.coord, feat, [len(feat)], resolution, cfg.grid_shape, cfg.grid_size)
    assert dense.shape == ex["dense_volume"].shape
    assert _maxabs(dense, ex["dense_volume"]) <= TOL
    with torch.no_grad():
        assert _maxabs(head.proj_net(torch.from_numpy(ex["dense_volume"])), ex["volume"]) <= TOL
        volume = head(feat, torch.from_numpy(fx["coord"]), [len(feat)])  # the whole chain from the points
    assert _maxabs(volume, ex["volume"]) <= TOL


def test_to_dense_small_scene_resizes_trilinearly():
    """Branch B (R < min(grid_shape)): the R³ mean grid resized with align_corners=False."""
    axis = torch.arange(4, dtype=torch.float32) * 0.02 + 0.001  # 4 voxels per axis -> resolution 4, R = 5
    coord = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
    feat = torch.stack([coord[:, 0], torch.ones(len(coord))], -1)  # channel 0 grows with x
    bbox = torch.stack([coord.min(0).values, coord.max(0).values])[None]
    _, resolution = grid_resolution(bbox, 0.02)
    assert int(resolution[0]) == 4
    dense = to_dense(coord, feat, [len(coord)], resolution, (8, 8, 8), 0.02)[0]  # (C, Z, Y, X)
    ref_grid = torch.zeros(2, 5, 5, 5)  # (C, z, y, x) mean grid of the R = 5 voxels; the last layer is empty
    ref_grid[:, :4, :4, :4] = feat.reshape(4, 4, 4, 2).permute(3, 2, 1, 0)
    ref = torch.nn.functional.interpolate(ref_grid[None], size=(8, 8, 8), mode="trilinear")[0]
    assert torch.allclose(dense, ref, atol=1e-6)
    assert torch.all(dense[0, 1:7, 1:7, 1:6].diff(dim=-1) > 0)  # channel 0 grows along X, the last axis


def test_to_dense_pools_by_mean_into_x_major_cells():
    coord = torch.tensor([[0.001, 0.001, 0.001], [0.011, 0.001, 0.001], [0.7, 0.1, 0.05], [0.7, 0.3, 0.35]])
    feat = torch.tensor([[1.0], [3.0], [5.0], [7.0]])
    resolution = torch.tensor([40], dtype=torch.int32)  # R = 41 >= 4: cells of 41/4 voxels
    dense = to_dense(coord, feat, [4], resolution, (4, 4, 4), 0.02)[0, 0]  # (Z, Y, X)
    assert dense[0, 0, 0] == 2.0  # the first two points share cell (0, 0, 0): mean of 1 and 3
    assert dense[0, 0, 3] == 5.0 and dense[1, 1, 3] == 7.0  # x indexes the last axis
    assert int((dense != 0).sum()) == 3


# ---------------------------------------------------------------- rays and rendering


def test_rays_match_fixture(fx):
    o, d = _fixture_rays(fx)
    assert _maxabs(o, fx["ex"]["ray_o"]) <= TOL and _maxabs(d, fx["ex"]["ray_d"]) <= TOL


def test_render_from_saved_volume_matches_fixture(fx):
    ex, head = fx["ex"], fx["head"]
    volume = torch.from_numpy(ex["volume"])
    with torch.no_grad():
        out = head.render(volume, torch.from_numpy(ex["ray_o"])[None], torch.from_numpy(ex["ray_d"])[None])
    errors = {k: _maxabs(out[k], ex[k]) for k in ("rgb", "depth", "normal", "semantic")}
    errors["z_vals"] = _maxabs(out["z_vals"][..., 0], ex["z_vals"])
    errors["weights"] = _maxabs(out["weights"][..., 0], ex["weights"])
    assert max(v for k, v in errors.items() if k != "semantic") <= TOL, errors
    assert errors["semantic"] <= 1e-3, errors
    # chunked rendering (val_ray_split) gives the same rays
    with torch.no_grad():
        chunked = head.renderer.render(torch.from_numpy(ex["ray_o"]), torch.from_numpy(ex["ray_d"]), volume[0], 100)
    for k in ("rgb", "depth", "normal", "semantic", "weights"):
        assert _maxabs(chunked[k], out[k]) <= 1e-5, k


def test_sdf_queries_match_fixture(fx):
    ex, field = fx["ex"], fx["head"].renderer.field
    q = torch.from_numpy(fx["cam"]["query_points_unit"])
    qn = normalize_3d_coordinate(q)
    grid = GridVolume.from_dense(torch.from_numpy(ex["volume"][0]))
    with torch.no_grad():
        sdf, _, feats = field.get_sdf(qn, grid)
        sdf_raw = field.get_sdf(q, grid)[0]  # the importance sampler's un-normalised lookup (QUIRK)
    assert _maxabs(qn, ex["query_points_norm"]) <= TOL
    assert _maxabs(sdf, ex["sdf"]) <= TOL and _maxabs(feats, ex["point_features"]) <= TOL
    assert _maxabs(sdf_raw, ex["sdf_rawcoords"]) <= TOL


def test_render_views_reproduce_fixture_pixels_in_metres(fx):
    """Cameras in the scene's original frame (cameras.npz) -> rgb and metric z-depth at the fixture pixels."""
    ex, cam = fx["ex"], fx["cam"]
    scene = to_unit_cube(torch.from_numpy(fx["coord"]))
    h, w = (int(v) for v in cam["image_hw"])
    view_cam = 0
    camera = Camera(K=cam["intrinsic"][view_cam][:3, :3], w2c=cam["extrinsic"][view_cam], width=w, height=h)
    (view,) = render_views(fx["head"].renderer, torch.from_numpy(ex["volume"][0]),
                           scene.cube.world_to_unit(fx["shift"]), [camera], chunk=1000)
    assert view.rgb.shape == (h, w, 3) and view.depth.shape == (h, w) and bool(view.hit.all())
    rows = np.flatnonzero(cam["cam_index"] == view_cam)
    ys, xs = cam["pixel_y"][rows], cam["pixel_x"][rows]
    assert _maxabs(view.rgb[ys, xs], ex["rgb"][rows]) <= TOL
    rays_cam = np.stack([xs, ys, np.ones_like(xs)], -1).astype(np.float64) @ np.linalg.inv(camera.K).T
    z_depth = ex["depth"][rows, 0] / float(scene.cube.scale) / np.linalg.norm(rays_cam, axis=-1)
    assert _maxabs(view.depth[ys, xs], z_depth) <= TOL
    assert fx["head"].training is False and fx["head"].renderer.training is False


# ---------------------------------------------------------------- training mode and the older layout


def test_training_mode_backpropagates_through_the_sdf_gradient(fx):
    ex, cfg = fx["ex"], fx["cfg"]
    head = PonderRenderHead(cfg)
    head.load_state_dict(fx["head"].state_dict())
    head.train()
    volume = torch.from_numpy(ex["volume"]).clone().requires_grad_()
    o, d = torch.from_numpy(ex["ray_o"][:32])[None], torch.from_numpy(ex["ray_d"][:32])[None]
    out = head.render(volume, o, d, generator=torch.Generator().manual_seed(0))
    assert out["z_vals"].shape == (32, 132, 1)
    target = torch.nn.functional.normalize(torch.randn(32, 512, generator=torch.Generator().manual_seed(1)), dim=-1)
    rays = TrainingRays(o, d, rgb=torch.full((32, 3), 0.5), depth=torch.from_numpy(ex["depth"][:32]).clone(),
                        semantic=target)
    losses = head.losses(out, rays)
    assert set(losses) == {"depth_loss", "rgb_loss", "psnr", "semantic_loss", "free_space_loss", "sdf_loss",
                           "eikonal_loss"}
    total_loss(losses).backward()
    assert torch.isfinite(volume.grad).all() and volume.grad.abs().sum() > 0
    field = head.renderer.field
    assert field.deviation_network.variance.grad.abs().sum() > 0  # through the NeuS alphas
    assert field.sdf_decoder.lin0.weight.grad.abs().sum() > 0
    assert torch.count_nonzero(field.sdf_decoder.fc_p.weight.grad) == 0  # 0 * fc_p, as the original


def test_legacy_layout_feeds_all_channels_and_points():
    cfg = RenderHeadConfig(field=legacy_field_config(volume_channels=8, geo_dim=4, hidden=8),
                           projection=RenderHeadConfig().projection.__class__(in_channels=4, out_channels=8,
                                                                              f_maps=(4, 8)))
    torch.manual_seed(0)
    field = PonderRenderHead(cfg).renderer.field.eval()
    pts = torch.rand(50, 3) * 0.5 + 0.25
    volume = torch.randn(8, 4, 5, 6)
    base = field.get_sdf(pts, GridVolume.from_dense(volume))[0]
    changed = volume.clone()
    changed[7] += 1.0  # the last channel reaches the SDF decoder only with share_volume
    assert not torch.allclose(field.get_sdf(pts, GridVolume.from_dense(changed))[0], base)
    with torch.no_grad():
        field.sdf_decoder.fc_p.bias.add_(1.0)  # fc_p(points) is added with points_factor 1
    assert not torch.allclose(field.get_sdf(pts, GridVolume.from_dense(volume))[0], base)
    with torch.no_grad():
        out = field(pts[:, None, :] - 0.5, torch.nn.functional.normalize(torch.ones(50, 1, 3), dim=-1),
                    GridVolume.from_dense(volume))
    assert out["rgb"].shape == (50, 1, 3) and out["semantic"].shape == (50, 1, 512)


# ---------------------------------------------------------------- cameras for the novel-view API


def test_camera_json_forms_agree():
    K = [[500.0, 0, 320.0], [0, 400.0, 240.0], [0, 0, 1]]
    c2w = np.eye(4)
    c2w[:3, :3] = [[0, 0, 1], [-1, 0, 0], [0, -1, 0]]  # looking along world +x, image up = world +z
    c2w[:3, 3] = [1.0, 2.0, 1.5]
    a = Camera.from_dict({"width": 640, "height": 480, "K": K, "camera_to_world": c2w.tolist()})
    b = Camera.from_dict({"width": 640, "height": 480, "fx": 500, "fy": 400, "cx": 320, "cy": 240,
                          "world_to_camera": np.linalg.inv(c2w).tolist()})
    assert np.allclose(a.K, b.K) and np.allclose(a.w2c, b.w2c)
    assert a.K.dtype == np.float64 and a.w2c.shape == (4, 4)
    parsed = cameras_from_json({"cameras": [a.to_dict(), b.to_dict()]})
    assert len(parsed) == 2 and np.allclose(parsed[1].w2c, b.w2c) and np.allclose(parsed[0].K, a.K)
    with pytest.raises(CameraError, match="camera 1"):
        cameras_from_json([a.to_dict(), {"width": 1}])
    origins, dirs = get_rays(480, 640, torch.tensor(a.K), torch.tensor(a.w2c))
    assert torch.allclose(dirs[240, 320], torch.tensor([1.0, 0.0, 0.0]), atol=1e-6)  # z forward
    assert dirs[0, 320, 2] > 0 and dirs[240, 639, 1] < 0  # image y down = world -z, image x right = world -y
    assert torch.allclose(origins[0, 0], torch.tensor([1.0, 2.0, 1.5]))


@pytest.mark.parametrize("bad, message", [
    ({"height": 4, "K": np.eye(3).tolist(), "world_to_camera": np.eye(4).tolist()}, "width"),
    ({"width": 4, "height": 4, "world_to_camera": np.eye(4).tolist()}, "intrinsics"),
    ({"width": 4, "height": 4, "K": np.eye(3).tolist(), "fx": 1.0, "world_to_camera": np.eye(4).tolist()},
     "exactly one"),
    ({"width": 4, "height": 4, "K": np.eye(3).tolist()}, "pose"),
    ({"width": 4, "height": 4, "K": np.eye(3).tolist(), "world_to_camera": np.eye(4).tolist(),
      "camera_to_world": np.eye(4).tolist()}, "exactly one"),
    ({"width": 4, "height": 4, "K": [[1, 0], [0, 1]], "world_to_camera": np.eye(4).tolist()}, "3x3"),
    ({"width": 4, "height": 4, "K": np.eye(3).tolist(), "world_to_camera": (2 * np.eye(4)).tolist()}, "last row"),
    ({"width": 4, "height": 4, "K": np.eye(3).tolist(), "world_to_camera": np.diag([2.0, 2, 2, 1]).tolist()},
     "orthonormal"),
    ({"width": 4, "height": 4, "K": [[-1, 0, 0], [0, 1, 0], [0, 0, 1]], "world_to_camera": np.eye(4).tolist()}, "fx"),
    ({"width": 4, "height": 4, "fx": "a", "fy": 1, "cx": 0, "cy": 0, "world_to_camera": np.eye(4).tolist()},
     "finite number"),
])
def test_malformed_cameras_raise_camera_error(bad, message):
    with pytest.raises(CameraError, match=message):
        Camera.from_dict(bad)
    assert issubclass(CameraError, ValueError)


def test_transforms_json_converts_opengl_poses_and_pixel_centres():
    c2w_gl = np.eye(4)
    c2w_gl[:3, 3] = [0.5, -1.0, 2.0]  # identity rotation: the camera looks along world -z, up is +y
    data = {"fl_x": 100.0, "fl_y": 120.0, "cx": 32.0, "cy": 24.0, "w": 64, "h": 48,
            "frames": [{"transform_matrix": c2w_gl.tolist()}, {"transform_matrix": c2w_gl.tolist(), "fl_x": 50.0}]}
    cams = cameras_from_transforms(data)
    assert len(cams) == 2 and cams[1].K[0, 0] == 50.0 and cams[0].K[1, 1] == 120.0
    assert cams[0].K[0, 2] == 31.5 and cams[0].K[1, 2] == 23.5  # +0.5 pixel centres -> integer centres
    c2w = cams[0].c2w
    assert np.allclose(c2w[:3, 2], [0, 0, -1]) and np.allclose(c2w[:3, 1], [0, -1, 0])  # forward, down
    assert np.allclose(c2w[:3, 3], [0.5, -1.0, 2.0])
    blender = cameras_from_transforms({"camera_angle_x": np.pi / 2, "w": 10, "h": 10,
                                       "frames": [{"transform_matrix": c2w_gl.tolist()}]})
    assert np.isclose(blender[0].K[0, 0], 5.0)
    with pytest.raises(CameraError, match="distortion"):
        cameras_from_transforms({**data, "k1": 0.1})
    with pytest.raises(CameraError, match="frame 0"):
        cameras_from_transforms({"w": 4, "h": 4, "frames": [{"transform_matrix": c2w_gl.tolist()}]})
    with pytest.raises(CameraError, match="frames"):
        cameras_from_transforms({"frames": []})

"""Rendering losses on hand-worked cases, and the training-ray targets they are computed against."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from model.render import LossConfig, get_rays, render_losses, sample_training_rays, total_loss

TAU = 0.05


def _pred(depth, rgb=None, sdf=None, z=None, gradients=None, semantic=None):
    r = len(depth)
    out = {"depth": torch.tensor(depth).reshape(r, 1),
           "rgb": torch.zeros(r, 3) if rgb is None else torch.tensor(rgb),
           "sdf": torch.zeros(r, 2, 1) if sdf is None else torch.tensor(sdf)[..., None],
           "z_vals": torch.ones(r, 2, 1) if z is None else torch.tensor(z)[..., None],
           "gradients": torch.ones(r, 2, 3) / math.sqrt(3) if gradients is None else torch.tensor(gradients)}
    if semantic is not None:
        out["semantic"] = torch.tensor(semantic)
    return out


def test_depth_loss_averages_over_valid_rays_only():
    cfg = LossConfig(rgb_loss=0, semantic_loss=0, free_space_loss=0, sdf_loss=0, eikonal_loss=0)
    pred = _pred([0.4, 0.9, 1.3, 0.2])
    target = {"depth": torch.tensor([[0.5], [-0.001], [1.0], [0.2]])}
    losses = render_losses(pred, target, cfg)
    assert set(losses) == {"depth_loss"}  # zero weights drop the other losses
    assert losses["depth_loss"].item() == pytest.approx((0.1 + 0.3 + 0.0) / 3, abs=1e-6)
    none_valid = render_losses(pred, {"depth": -torch.ones(4, 1)}, cfg)
    assert none_valid["depth_loss"].item() == 0.0


def test_rgb_loss_covers_all_rays_and_psnr_is_logged_only():
    cfg = LossConfig(depth_loss=0, semantic_loss=0, free_space_loss=0, sdf_loss=0, eikonal_loss=0)
    pred = _pred([0.5, 0.5], rgb=[[0.2, 0.4, 0.6], [1.0, 0.0, 0.0]])
    target = {"depth": torch.tensor([[0.5], [-0.001]]), "rgb": torch.tensor([[0.0, 0.4, 0.6], [0.0, 0.0, 0.0]])}
    losses = render_losses(pred, target, cfg)
    assert losses["rgb_loss"].item() == pytest.approx(10.0 * (0.2 + 1.0) / 6, abs=1e-6)  # the invalid ray counts
    assert losses["psnr"].item() == pytest.approx(20 * math.log10(1 / math.sqrt((0.04 + 1.0) / 6)), abs=1e-4)
    assert total_loss(losses).item() == pytest.approx(losses["rgb_loss"].item())  # psnr is not optimised


def test_free_space_and_sdf_losses_split_samples_around_the_surface():
    cfg = LossConfig(depth_loss=0, rgb_loss=0, semantic_loss=0, eikonal_loss=0)
    z = [[0.1, 0.3, 0.45, 0.5, 0.6], [0.1, 0.2, 0.3, 0.4, 0.5]]
    sdf = [[0.01, 0.2, 0.04, -0.02, -0.1], [5.0, 5.0, 5.0, 5.0, 5.0]]
    pred = _pred([0.5, 0.5], sdf=sdf, z=z, gradients=torch.zeros(2, 5, 3).tolist())
    target = {"depth": torch.tensor([[0.5], [-0.001]])}  # the second ray is invalid: ignored
    losses = render_losses(pred, target, cfg)
    # ray 0: front (z < D - tau) = samples 0, 1; back (z > D + tau) = sample 4; band = samples 2, 3
    assert losses["free_space_loss"].item() == pytest.approx((0.04 + 0.0) / 2, abs=1e-6)
    band = abs(0.45 + 0.04 - 0.5) + abs(0.5 - 0.02 - 0.5)
    assert losses["sdf_loss"].item() == pytest.approx(10.0 * band / 2, abs=1e-5)


def test_eikonal_loss_uses_every_sample():
    cfg = LossConfig(depth_loss=0, rgb_loss=0, semantic_loss=0, free_space_loss=0, sdf_loss=0)
    grads = [[[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]], [[0.0, 0.0, 0.0], [3.0, 4.0, 0.0]]]
    losses = render_losses(_pred([0.5, -1.0], gradients=grads), {"depth": torch.tensor([[0.5], [-1.0]])}, cfg)
    assert losses["eikonal_loss"].item() == pytest.approx(0.01 * (0 + 1 + 1 + 16) / 4, abs=1e-7)


def test_semantic_loss_is_a_contrastive_cross_entropy_over_all_rays():
    cfg = LossConfig(depth_loss=0, rgb_loss=0, free_space_loss=0, sdf_loss=0, eikonal_loss=0)
    e = np.eye(4, dtype=np.float32)
    target = np.stack([e[0], np.zeros(4, np.float32), e[1], e[0]])  # ray 1: label 0 -> zero target
    pred_sem = np.array([[2.0, 0.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0], [0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]],
                        np.float32)
    depth = torch.tensor([[0.5], [0.5], [0.5], [-0.001]])  # ray 3 is outside the box: ignored as a row
    losses = render_losses(_pred([0.5] * 4, semantic=pred_sem.tolist()),
                           {"depth": depth, "semantic": torch.from_numpy(target)}, cfg)
    unit = pred_sem / np.linalg.norm(pred_sem, axis=1, keepdims=True)
    logits = unit @ target.T / 0.01  # (4, 4): every ray is a column, even ignored ones
    rows = [0, 2]
    ce = [-(logits[i, i] - np.log(np.exp(logits[i] - logits[i].max()).sum()) - logits[i].max()) for i in rows]
    assert losses["semantic_loss"].item() == pytest.approx(0.1 * float(np.mean(ce)), rel=1e-5)
    nothing = render_losses(_pred([0.5] * 4, semantic=pred_sem.tolist()),
                            {"depth": depth, "semantic": torch.zeros(4, 4)}, cfg)
    assert nothing["semantic_loss"].item() == 0.0


def test_missing_inputs_are_named():
    with pytest.raises(ValueError, match="semantic"):
        render_losses(_pred([0.5]), {"depth": torch.ones(1, 1), "rgb": torch.zeros(1, 3)}, LossConfig())


# ---------------------------------------------------------------- training rays (targets of the losses)

H, W = 6, 8
K = torch.tensor([[4.0, 0.0, 3.5], [0.0, 4.0, 2.5], [0.0, 0.0, 1.0]])


def _views():
    """Two views of one scene: 0 at (0, 0, -0.3) looking +z (inside the box), 1 at (0, 0, -5) looking away."""
    w2c0 = torch.eye(4)
    w2c0[2, 3] = 0.3
    w2c1 = torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0]))
    w2c1[2, 3] = -5.0  # camera centre (0, 0, -5), optical axis world -z
    depth = torch.full((2, H, W), 0.4)  # z-depth in sensor units
    depth[0, :, :2] = 0.0  # invalid pixels never become rays
    ys, xs = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    rgb = torch.stack([xs / 10, ys / 10, torch.full_like(xs, 0.5, dtype=torch.float32)], -1).float()
    labels = torch.where(xs % 2 == 0, 0, 2).to(torch.int16)  # label 0 (QUIRK: no target) and label 2
    return (rgb.expand(1, 2, H, W, 3), depth[None], torch.stack([w2c0, w2c1])[None], labels.expand(1, 2, H, W))


def test_training_rays_targets():
    rgb, depth, w2c, labels = _views()
    index2semantic = torch.eye(3, 5)
    scale = torch.tensor([0.5])
    rays = sample_training_rays(rgb, depth, K.expand(1, 2, 3, 3), w2c, scale, ray_nsample=10, semantic=labels,
                                index2semantic=index2semantic, generator=torch.Generator().manual_seed(0))
    assert rays.origins.shape == (1, 20, 3) and rays.rgb.shape == (20, 3) and rays.semantic.shape == (20, 5)
    o, d = get_rays(H, W, K, w2c[0, 0])
    for r in range(10):  # view 0: valid pixels only; targets at the ray's own pixel
        x, y = round(rays.rgb[r, 0].item() * 10), round(rays.rgb[r, 1].item() * 10)
        assert x >= 2 and torch.allclose(rays.directions[0, r], d[y, x])
        cos = rays.directions[0, r] @ torch.tensor([0.0, 0.0, 1.0])
        assert rays.depth[r, 0].item() * cos.item() == pytest.approx(0.4 * 0.5, rel=1e-5)  # plane -> ray
        expected = index2semantic[2] if x % 2 == 1 else torch.zeros(5)
        assert torch.equal(rays.semantic[r], expected)
    # view 1 looks away from the box: every ray is masked
    assert torch.all(rays.depth[10:] == -0.001) and torch.all(rays.rgb[10:] == 0) and torch.all(rays.semantic[10:] == 0)
    again = sample_training_rays(rgb, depth, K.expand(1, 2, 3, 3), w2c, scale, ray_nsample=10, semantic=labels,
                                 index2semantic=index2semantic, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.origins, rays.origins) and torch.equal(again.depth, rays.depth)
    z_as_ray = sample_training_rays(rgb, depth, K[None], w2c, scale, ray_nsample=10, plane_to_ray=False,
                                    generator=torch.Generator().manual_seed(0))  # shared (B, 3, 3) intrinsics
    assert torch.allclose(z_as_ray.depth[:10], torch.full((10, 1), 0.2)) and z_as_ray.semantic is None


def test_training_rays_errors():
    rgb, depth, w2c, labels = _views()
    with pytest.raises(ValueError, match="fewer than ray_nsample"):
        sample_training_rays(rgb, depth, K[None], w2c, torch.ones(1), ray_nsample=H * W)
    with pytest.raises(ValueError, match="intrinsic"):
        sample_training_rays(rgb, depth, K, w2c, torch.ones(1), ray_nsample=4)
    with pytest.raises(ValueError, match="no embedding"):
        sample_training_rays(rgb, depth, K[None], w2c, torch.ones(1), ray_nsample=4, semantic=labels,
                             index2semantic=torch.eye(2, 5))
    with pytest.raises(ValueError, match="together"):
        sample_training_rays(rgb, depth, K[None], w2c, torch.ones(1), ray_nsample=4, semantic=labels)

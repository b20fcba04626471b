"""The trilinear sampler equals grid_sample(align_corners=True, zeros) and is twice differentiable."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import model.render.trilinear as tri
from model.render.trilinear import GridVolume, sample, trilinear_sample


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def grid_sample_ref(volume: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """The original's feature lookup: (C, Z, Y, X) volume, (P, 3) points in [0, 1] -> (P, C)."""
    grid = (2 * points - 1)[None, None, None]
    return F.grid_sample(volume[None], grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0, :, 0, 0].T


def test_matches_grid_sample_inside_outside_and_on_borders():
    g = torch.Generator().manual_seed(0)
    volume = torch.randn(5, 4, 6, 7, generator=g)
    inside = torch.rand(400, 3, generator=g)
    outside = torch.rand(400, 3, generator=g) * 2.0 - 0.5  # zeros padding, partial cells at the faces
    far = torch.tensor([[5.0, 0.5, 0.5], [-3.0, -3.0, -3.0], [0.5, 0.5, 1e6]])
    size = torch.tensor([7.0, 6.0, 4.0])
    nodes = torch.stack(torch.meshgrid(*(torch.arange(n) / (n - 1) for n in (7, 6, 4)), indexing="ij"), -1)
    nodes = nodes.reshape(-1, 3)  # exactly on grid nodes, including every border node
    faces = torch.tensor([[0.0, 0.3, 0.7], [1.0, 0.3, 0.7], [0.2, 0.0, 1.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    just_out = torch.tensor([[1.0 + 1e-6, 0.5, 0.5], [-1e-6, 0.5, 0.5], [0.5, 1 + 0.5 / 5, 0.5]])
    for pts in (inside, outside, far, nodes, faces, just_out, nodes + 0.5 / (size - 1)):
        assert (trilinear_sample(volume, pts) - grid_sample_ref(volume, pts)).abs().max() <= 1e-6
    assert torch.equal(trilinear_sample(volume, far), torch.zeros(3, 5))


def test_keeps_leading_point_dims_and_channel_slices():
    g = torch.Generator().manual_seed(1)
    volume = torch.randn(6, 3, 5, 4, generator=g)
    pts = torch.rand(7, 11, 3, generator=g)
    full = trilinear_sample(volume, pts)
    assert full.shape == (7, 11, 6)
    half = sample(GridVolume.from_dense(volume).channel_slice(3), pts)
    assert torch.equal(half, full[..., :3])


def test_first_order_gradients_match_grid_sample():
    g = torch.Generator().manual_seed(2)
    volume = torch.randn(4, 5, 6, 7, generator=g)
    pts = torch.rand(300, 3, generator=g) * 1.4 - 0.2
    upstream = torch.randn(300, 4, generator=g)
    v1, p1 = volume.clone().requires_grad_(), pts.clone().requires_grad_()
    v2, p2 = volume.clone().requires_grad_(), pts.clone().requires_grad_()
    gv_ref, gp_ref = torch.autograd.grad(grid_sample_ref(v1, p1), (v1, p1), upstream)
    gv, gp = torch.autograd.grad(trilinear_sample(v2, p2), (v2, p2), upstream)
    assert (gv - gv_ref).abs().max() <= 1e-5
    assert (gp - gp_ref).abs().max() <= 1e-4 * max(1.0, gp_ref.abs().max().item())


def test_gradcheck_and_gradgradcheck_float64():
    g = torch.Generator().manual_seed(3)
    volume = torch.randn(2, 3, 4, 5, dtype=torch.float64, generator=g).requires_grad_()
    # random points (away from cell faces, where trilinear interpolation has kinks), some partly outside
    pts = (torch.rand(8, 3, dtype=torch.float64, generator=g) * 1.3 - 0.15).requires_grad_()
    assert torch.autograd.gradcheck(trilinear_sample, (volume, pts))
    assert torch.autograd.gradgradcheck(trilinear_sample, (volume, pts))


def test_double_backward_through_sdf_gradient():
    """The field's use: grad of an MLP of the samples w.r.t. the points (create_graph), then a loss of that
    gradient back-propagated to the volume. Checked against finite differences in float64."""
    g = torch.Generator().manual_seed(4)
    volume = torch.randn(3, 4, 4, 4, dtype=torch.float64, generator=g)
    pts = torch.rand(5, 3, dtype=torch.float64, generator=g) * 0.8 + 0.1
    w = torch.randn(3, dtype=torch.float64, generator=g)

    def eikonal(vol: torch.Tensor) -> torch.Tensor:
        p = pts.clone().requires_grad_()
        sdf = torch.tanh(trilinear_sample(vol, p) @ w)
        (grad,) = torch.autograd.grad(sdf.sum(), p, create_graph=True)
        return ((grad.norm(dim=-1) - 1) ** 2).sum()

    assert torch.autograd.gradcheck(eikonal, (volume.clone().requires_grad_(),))


def test_blocked_passes_equal_one_block(monkeypatch):
    g = torch.Generator().manual_seed(5)
    volume = torch.randn(3, 4, 5, 6, dtype=torch.float64, generator=g)
    pts = torch.rand(50, 3, dtype=torch.float64, generator=g) * 1.2 - 0.1
    upstream = torch.randn(50, 3, dtype=torch.float64, generator=g)

    def run():
        v, p = volume.clone().requires_grad_(), pts.clone().requires_grad_()
        out = trilinear_sample(v, p)
        gv, gp = torch.autograd.grad(out, (v, p), upstream, create_graph=True)
        ggv, ggp = torch.autograd.grad((gp ** 2).sum(), (v, p))
        return out, gv, gp, ggv, ggp

    whole = run()
    monkeypatch.setattr(tri, "_BLOCK_ELEMS", 7)  # two points per block
    blocked = run()
    for a, b in zip(whole, blocked):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)


def test_saves_only_the_volume_and_point_indices():
    """Memory: the autograd graph keeps the channels-last volume and (P, 3) indices, never (P, C) or
    (P, 8, C) temporaries (for 10k rays x 132 samples x 128 channels those would be 0.7-5.4 GB)."""
    volume = torch.randn(16, 8, 8, 8, requires_grad=True)
    pts = torch.rand(20000, 3, requires_grad=True)
    saved = []

    def pack(t: torch.Tensor):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        trilinear_sample(volume, pts)
    assert max(saved) <= max(volume.numel(), pts.numel())
    assert sum(saved) <= volume.numel() + 2 * pts.numel() + 16


def test_rejects_bad_shapes():
    with pytest.raises(ValueError, match="end in 3"):
        trilinear_sample(torch.zeros(2, 3, 3, 3), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="C, Z, Y, X"):
        trilinear_sample(torch.zeros(3, 3, 3), torch.zeros(4, 3))

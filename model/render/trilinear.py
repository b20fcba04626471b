"""Trilinear sampling of a dense (C, Z, Y, X) volume, equal to

    F.grid_sample(V[None], (2p - 1)[None, None], mode="bilinear", padding_mode="zeros", align_corners=True)

and twice differentiable with respect to the points (torch's 3-D grid_sample has no double backward,
which the SDF field needs: its gradient feeds the colour decoder, the NeuS alphas and the eikonal loss).

Written with gathers and arithmetic only, as two autograd Functions (value, and gradient whose own
backward is the second derivative). Memory: the forward saves only the (channels-last) volume and the (P, 3)
continuous indices (a differentiable gradient additionally keeps its (P, C) upstream gradient), never the
(P, 8, C) corner values; every pass works on blocks of points, so temporaries stay at about ``_BLOCK_ELEMS``
floats whatever the number of points (10k rays x 132 samples x 128 channels included).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

_BLOCK_ELEMS = 1 << 22  # floats per (points x channels) temporary: 16 MiB in float32

# Corner order of grid_sample's kernel: z outer, then y, then x (tnw, tne, tsw, tse, bnw, bne, bsw, bse).
_CORNERS = tuple((cz, cy, cx) for cz in (0, 1) for cy in (0, 1) for cx in (0, 1))


@dataclass(frozen=True)
class GridVolume:
    """A (C, Z, Y, X) volume stored channels-last as (Z*Y*X, C) rows, so a point gather reads whole rows."""

    values: Tensor  # (Z*Y*X, C)
    size_xyz: tuple[int, int, int]

    @classmethod
    def from_dense(cls, volume: Tensor) -> "GridVolume":
        if volume.dim() != 4:
            raise ValueError(f"volume must be (C, Z, Y, X), got shape {tuple(volume.shape)}")
        c, z, y, x = volume.shape
        return cls(volume.permute(1, 2, 3, 0).reshape(z * y * x, c), (x, y, z))

    @property
    def channels(self) -> int:
        return self.values.shape[1]

    def channel_slice(self, stop: int) -> "GridVolume":
        """The first ``stop`` channels (a view: sampling them costs a fraction of sampling all)."""
        return GridVolume(self.values[:, :stop], self.size_xyz)


def sample(volume: GridVolume, points: Tensor) -> Tensor:
    """Features at ``points`` (..., 3) = (x, y, z) in [0, 1] grid units; outside reads zeros. -> (..., C)."""
    if points.shape[-1] != 3:
        raise ValueError(f"points must end in 3 coordinates (x, y, z), got shape {tuple(points.shape)}")
    x, y, z = volume.size_xyz
    extent = torch.tensor([x - 1, y - 1, z - 1], dtype=points.dtype, device=points.device)
    grid = points * 2 - 1
    index = (grid + 1) / 2 * extent  # grid_sample's unnormalize with align_corners=True
    out = _Trilerp.apply(volume.values.to(points.dtype), index.reshape(-1, 3), volume.size_xyz)
    return out.reshape(*points.shape[:-1], volume.channels)


def trilinear_sample(volume: Tensor, points: Tensor) -> Tensor:
    """``sample`` for a dense (C, Z, Y, X) volume."""
    return sample(GridVolume.from_dense(volume), points)


@dataclass
class _Corner:
    index: Tensor  # (p,) flat row of the corner, clamped into the volume
    weight: Tensor  # (p,) trilinear weight, 0 where the corner lies outside
    dweight: Tensor | None  # (p, 3) d weight / d (ix, iy, iz)
    hessian: Tensor | None  # (p, 3) d2 weight / (dx dy, dx dz, dy dz); the diagonal is zero


def _corners(u: Tensor, size_xyz: tuple[int, int, int], derivatives: bool = False) -> list[_Corner]:
    """The 8 corners of each continuous index ``u`` (p, 3), in grid_sample's order."""
    lo = torch.floor(u)
    frac_hi = u - lo  # weight of the upper corner (grid_sample: ix - ix_tnw)
    frac_lo = (lo + 1) - u  # weight of the lower corner (grid_sample: ix_bse - ix)
    strides = (1, size_xyz[0], size_xyz[0] * size_xyz[1])
    axis = []  # per axis: [(flat offset, weight, d weight / d u) for the lower, upper side]
    for a in range(3):
        sides = []
        for base, w, sign in ((lo[:, a], frac_lo[:, a], -1.0), (lo[:, a] + 1, frac_hi[:, a], 1.0)):
            valid = ((base >= 0) & (base < size_xyz[a])).to(u.dtype)
            flat = base.clamp(0, size_xyz[a] - 1).long() * strides[a]
            sides.append((flat, w * valid, valid * sign if derivatives else None))
        axis.append(sides)
    out = []
    for cz, cy, cx in _CORNERS:
        (ix, wx, dx), (iy, wy, dy), (iz, wz, dz) = axis[0][cx], axis[1][cy], axis[2][cz]
        dweight = hessian = None
        if derivatives:
            dweight = torch.stack([dx * wy * wz, wx * dy * wz, wx * wy * dz], dim=-1)
            hessian = torch.stack([dx * dy * wz, dx * wy * dz, wx * dy * dz], dim=-1)
        out.append(_Corner(index=iz + iy + ix, weight=wx * wy * wz, dweight=dweight, hessian=hessian))
    return out


def _blocks(n_points: int, channels: int):
    step = max(1, _BLOCK_ELEMS // max(channels, 1))
    for start in range(0, n_points, step):
        yield slice(start, min(start + step, n_points))


def _hess_times(h: Tensor, v: Tensor) -> Tensor:
    """(H v) for the symmetric zero-diagonal Hessian given by its off-diagonals h = (xy, xz, yz)."""
    return torch.stack([h[:, 0] * v[:, 1] + h[:, 1] * v[:, 2],
                        h[:, 0] * v[:, 0] + h[:, 2] * v[:, 2],
                        h[:, 1] * v[:, 0] + h[:, 2] * v[:, 1]], dim=-1)


class _Trilerp(torch.autograd.Function):
    """out[p] = sum_corners w_c(u_p) * V[idx_c(u_p)]."""

    @staticmethod
    def forward(ctx, values: Tensor, u: Tensor, size_xyz: tuple[int, int, int]) -> Tensor:
        out = values.new_zeros(u.shape[0], values.shape[1])
        for blk in _blocks(u.shape[0], values.shape[1]):
            acc = out[blk]
            for c in _corners(u[blk], size_xyz):
                acc += values.index_select(0, c.index) * c.weight[:, None]
        ctx.save_for_backward(values, u)
        ctx.size_xyz = size_xyz
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        values, u = ctx.saved_tensors
        need_v, need_u = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_v, grad_u = _TrilerpGrad.apply(grad_out, values, u, ctx.size_xyz, need_v, need_u)
        return grad_v, grad_u, None


class _TrilerpGrad(torch.autograd.Function):
    """(dL/dV, dL/du) of ``_Trilerp`` for an upstream gradient G; its own backward gives the second order."""

    @staticmethod
    def forward(ctx, g: Tensor, values: Tensor, u: Tensor, size_xyz, need_v: bool, need_u: bool):
        g = g.contiguous()
        grad_v = torch.zeros_like(values) if need_v else None
        grad_u = torch.zeros_like(u) if need_u else None
        for blk in _blocks(u.shape[0], values.shape[1]):
            gb = g[blk]
            for c in _corners(u[blk], size_xyz, derivatives=need_u):
                if need_v:
                    grad_v.index_add_(0, c.index, gb * c.weight[:, None])
                if need_u:
                    dot = (values.index_select(0, c.index) * gb).sum(-1, keepdim=True)
                    grad_u[blk] += dot * c.dweight
        ctx.save_for_backward(g, values, u)
        ctx.size_xyz = size_xyz
        ctx.set_materialize_grads(False)
        return grad_v, grad_u

    @staticmethod
    @once_differentiable
    def backward(ctx, gg_v: Tensor | None, gg_u: Tensor | None):
        g, values, u = ctx.saved_tensors
        need_g, need_v, need_u = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        out_g = torch.zeros_like(g) if need_g and (gg_v is not None or gg_u is not None) else None
        out_v = torch.zeros_like(values) if need_v and gg_u is not None else None
        out_u = torch.zeros_like(u) if need_u and (gg_v is not None or gg_u is not None) else None
        for blk in _blocks(u.shape[0], values.shape[1]):
            gb = g[blk]
            ggu = gg_u[blk] if gg_u is not None else None
            for c in _corners(u[blk], ctx.size_xyz, derivatives=True):
                if gg_v is not None:  # d/d(g, u) of <gg_v, grad_v> = sum_p w_c <g_p, gg_v[idx_c]>
                    rows = gg_v.index_select(0, c.index)
                    if out_g is not None:
                        out_g[blk] += rows * c.weight[:, None]
                    if out_u is not None:
                        out_u[blk] += (rows * gb).sum(-1, keepdim=True) * c.dweight
                if ggu is not None:  # d/d(g, V, u) of <gg_u, grad_u> = sum_p (gg_u . dw_c) <g_p, V[idx_c]>
                    s = (ggu * c.dweight).sum(-1, keepdim=True)
                    rows = values.index_select(0, c.index) if (out_g is not None or out_u is not None) else None
                    if out_g is not None:
                        out_g[blk] += rows * s
                    if out_v is not None:
                        out_v.index_add_(0, c.index, gb * s)
                    if out_u is not None:
                        out_u[blk] += (rows * gb).sum(-1, keepdim=True) * _hess_times(c.hessian, ggu)
        return out_g, out_v, out_u, None, None, None

"""Sparse convolutions as gathers and dense matmuls over the tables of `kernel_maps`.

These ops use only indexing, matmul and elementwise arithmetic, so they export to ONNX as
Gather/MatMul/Add (no Scatter, which is either wrong or non-deterministic in onnxruntime) and run on
any device without spconv.

Formulation, measured on this project's CPU (131k-voxel generated room, 27 taps, torch 2.13, one
thread, CPU time): one matmul per tap accumulated into the output (``addmm``) vs gathering n taps into
one (M, n*C_in) operand: 32->32 channels 0.35 s vs 0.47-0.50 s; 96->96 2.9 s vs 2.3-2.9 s; the
6-channel stem (125 taps) 0.82 s vs 0.44-0.53 s. So taps are accumulated one by one (which never
materialises a large gathered operand: (M, 27, 96) floats are 1.4 GB at 133k voxels), except for
inputs narrower than 16 channels, where ~128-wide groups of taps are gathered together. onnxruntime
differs: there one gather + one GEMM over all 27 taps was 1.5-2x faster than per-tap Gemms (32, 64
and 96 channels), at the price of an (M, 27*C_in) operand, so it is an export option
(``taps_per_matmul``). Rows are picked with ``index_select`` (ONNX Gather): advanced indexing
``x[idx]`` was 10-30x slower.
"""

from __future__ import annotations

import torch


def pad_zero_row(feat: torch.Tensor) -> torch.Tensor:
    """(M, C) → (M + 1, C): row M is the "missing neighbour" the tables point to."""
    return torch.cat([feat, feat.new_zeros(1, feat.shape[1])], dim=0)


def gather_conv(feat: torch.Tensor, table: torch.Tensor, weight: torch.Tensor,
                taps_per_matmul: int | None = None) -> torch.Tensor:
    """``out[r] = sum_k pad(feat)[table[r, k]] @ weight[k]``.

    feat: (M_in, C_in); table: (M_out, K) int32 (or int64) with M_in = missing; weight: (K, C_in, C_out).
    taps_per_matmul: how many taps share one gather + matmul (None: 1, or ~128/C_in for narrow
    inputs; K: a single (M_out, K*C_in) @ (K*C_in, C_out) product, fastest in onnxruntime but it
    materialises the whole gathered operand). Returns (M_out, C_out).
    """
    taps, c_in, c_out = weight.shape
    if table.shape[1] != taps:
        raise ValueError(f"table has {table.shape[1]} taps but the weight has {taps}")
    if feat.shape[1] != c_in:
        raise ValueError(f"features have {feat.shape[1]} channels but the weight expects {c_in}")
    padded = pad_zero_row(feat)  # (M_in + 1, C_in)
    group = taps_per_matmul or (1 if c_in >= 16 else max(1, 128 // c_in))  # see the module docstring
    out = None
    for k in range(0, taps, group):
        n = min(group, taps - k)
        if n == 1:  # plain column: keeps the exported graph small (one Gather, no Slice/Reshape)
            gathered, w = padded.index_select(0, table[:, k]), weight[k]
        else:
            gathered = padded.index_select(0, table[:, k : k + n].reshape(-1)).reshape(-1, n * c_in)  # (M_out, n*C_in)
            w = weight[k : k + n].reshape(n * c_in, c_out)
        out = gathered @ w if out is None else torch.addmm(out, gathered, w)
    return out


def inverse_conv(coarse: torch.Tensor, up_table: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The inverse (transposed k2s2) conv over an up table: ``out[p] = coarse[parent(p)] @ weight[tap(p)]``.

    Same result as ``gather_conv(coarse, up_table, weight)``, but an up row has exactly one real entry,
    so this computes every (coarse row, tap) product once, ``(M_c, C_in) @ (C_in, 8*C_out)``, and
    gathers one row per fine site instead of running 8 matmuls over M_f rows of which 7 are zeros.

    coarse: (M_c, C_in); up_table: (M_f, 8) with parent at column tap(p), M_c elsewhere;
    weight: (8, C_in, C_out). Returns (M_f, C_out).
    """
    taps, c_in, c_out = weight.shape
    parent, tap = torch.min(up_table, dim=1)  # the parent is the only entry < M_c (tap: int64)
    every = coarse @ weight.permute(1, 0, 2).reshape(c_in, taps * c_out)  # (M_c, 8*C_out)
    return every.reshape(-1, c_out).index_select(0, parent.to(tap.dtype) * taps + tap)  # (M_f, C_out)


def conv1x1(feat: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """spconv's kernel-volume-1 conv: ``feat @ weight.view(C_in, C_out)``.

    spconv 2.x reinterprets the stored (C_out, 1, 1, 1, C_in) buffer as a row-major (C_in, C_out)
    matrix instead of transposing it (spconv issue #450); the official checkpoints were trained with
    this, so it must be reproduced. `weight` may be the raw spconv tensor or already (C_in, C_out).
    """
    c_in = feat.shape[1]
    if weight.numel() % c_in:
        raise ValueError(f"a 1x1 weight of {weight.numel()} elements cannot take {c_in} input channels")
    return feat @ weight.reshape(c_in, -1)


def taps_from_spconv(weight: torch.Tensor) -> torch.Tensor:
    """spconv weight (C_out, kx, ky, kz, C_in) → (K, C_in, C_out) with K = kx*ky*kz in the tables'
    flat tap order ``i*ky*kz + j*kz + k`` (for k2s2 convs: ``4*tx + 2*ty + tz``).

    Do not use this for kernel-volume-1 weights: spconv does not contract those this way
    (see `conv1x1_from_spconv`)."""
    if weight.dim() != 5:
        raise ValueError(f"expected a spconv weight (C_out, kx, ky, kz, C_in), got shape {tuple(weight.shape)}")
    c_out, kx, ky, kz, c_in = weight.shape
    if kx * ky * kz == 1:
        raise ValueError("kernel-volume-1 weights follow spconv's conv1x1 quirk; use conv1x1_from_spconv")
    return weight.permute(1, 2, 3, 4, 0).reshape(kx * ky * kz, c_in, c_out).contiguous()


def conv1x1_from_spconv(weight: torch.Tensor) -> torch.Tensor:
    """spconv kernel-volume-1 weight (C_out, 1, 1, 1, C_in) → the (C_in, C_out) matrix spconv multiplies
    by, i.e. the same buffer read row-major (a reshape, NOT a transpose)."""
    if weight.dim() != 5 or tuple(weight.shape[1:4]) != (1, 1, 1):
        raise ValueError(f"expected a (C_out, 1, 1, 1, C_in) weight, got shape {tuple(weight.shape)}")
    c_out, c_in = weight.shape[0], weight.shape[4]
    return weight.contiguous().reshape(c_in, c_out).clone()


__all__ = [
    "conv1x1",
    "conv1x1_from_spconv",
    "gather_conv",
    "inverse_conv",
    "pad_zero_row",
    "taps_from_spconv",
]

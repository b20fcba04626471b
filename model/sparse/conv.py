"""spconv layer factories and the device-dependent choice of spconv algorithm.

spconv picks its algorithm when a layer is built: the CUDA build defaults to implicit GEMM, which
cannot run on a CPU. The official checkpoints do not depend on the algorithm, so the layers choose it
when they are placed: built and moved (``.to``/``.cuda``/``.cpu``, i.e. ``nn.Module._apply``), each layer
takes ``ConvAlgo.Native`` on a CPU and spconv's default fast one on CUDA. Nothing is checked per forward.
Importing this module imports spconv (seconds): only the spconv backbones and `place` (when spconv is already
loaded) do; inference with the default backend never does (see model.backbones.engine_backed).
"""

from __future__ import annotations

import logging

import spconv.pytorch as spconv
import torch
from spconv.pytorch import ConvAlgo
from torch import nn

# spconv wraps SparseConvTensor for torch.fx, whose first call makes torch 2.13 log a deprecation note about
# its own is_fx_tracing on stderr ("W... is_fx_tracing will return true ..."): nothing the user can act on.
logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)

_DEFAULT_ALGO = "_ponder_default_algo"


def subm_conv(in_channels: int, out_channels: int, kernel_size: int, indice_key: str | None = None,
              bias: bool = False) -> spconv.SubMConv3d:
    """Submanifold conv (output sites = input sites). spconv ignores ``padding`` here; the kernel is centred."""
    padding = 1 if kernel_size > 1 else 0
    return _remember(SubMConv3d(in_channels, out_channels, kernel_size, padding=padding, bias=bias,
                                       indice_key=indice_key))


def down_conv(in_channels: int, out_channels: int, indice_key: str) -> spconv.SparseConv3d:
    """k=2, stride=2 downsampling: every site p feeds the coarse site floor(p / 2)."""
    return _remember(SparseConv3d(in_channels, out_channels, 2, stride=2, bias=False,
                                         indice_key=indice_key))


def inverse_conv(in_channels: int, out_channels: int, indice_key: str) -> spconv.SparseInverseConv3d:
    """Inverse of the down conv with the same ``indice_key``: restores the fine sites, in their order."""
    return _remember(SparseInverseConv3d(in_channels, out_channels, 2, bias=False,
                                                indice_key=indice_key))


class _PlacedAlgorithm:
    """Mixin for spconv conv layers: re-choose the algorithm whenever the layer's tensors move."""

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        _choose_algorithm(self)
        return out


class SubMConv3d(_PlacedAlgorithm, spconv.SubMConv3d):
    pass


class SparseConv3d(_PlacedAlgorithm, spconv.SparseConv3d):
    pass


class SparseInverseConv3d(_PlacedAlgorithm, spconv.SparseInverseConv3d):
    pass


def _choose_algorithm(layer: spconv.conv.SparseConvolution) -> None:
    default = getattr(layer, _DEFAULT_ALGO, layer.algo)
    layer.algo = default if layer.weight.device.type == "cuda" else ConvAlgo.Native


def _remember(conv: spconv.conv.SparseConvolution) -> spconv.conv.SparseConvolution:
    setattr(conv, _DEFAULT_ALGO, conv.algo)
    _choose_algorithm(conv)  # built on the CPU: Native until moved to CUDA
    return conv


def use_device_algorithms(module: nn.Module, device: torch.device | str) -> None:
    """Set the algorithm for ``device`` of every spconv layer built elsewhere (layers built here chose it
    themselves when they were moved, see `_PlacedAlgorithm`, and are left alone)."""
    device = torch.device(device)
    for layer in module.modules():
        if isinstance(layer, spconv.conv.SparseConvolution) and not isinstance(layer, _PlacedAlgorithm):
            default = getattr(layer, _DEFAULT_ALGO, layer.algo)
            layer.algo = ConvAlgo.Native if device.type != "cuda" else default


def make_sparse_tensor(feat: torch.Tensor, grid_coord: torch.Tensor, batch: torch.Tensor,
                       margin: int = 96) -> spconv.SparseConvTensor:
    """Build the SparseConvTensor the official backbones build.

    feat (N, C) float, grid_coord (N, 3) non-negative int, batch (N,) scene index (sorted or not).
    The spatial shape is max(grid_coord) + 96, the official rule (it keeps 4 halvings in range).
    """
    indices = torch.cat([batch.view(-1, 1).int(), grid_coord.int()], dim=1).contiguous()
    spatial_shape = (grid_coord.max(dim=0).values + margin).tolist()
    batch_size = int(batch.max().item()) + 1 if len(batch) else 1
    return spconv.SparseConvTensor(features=feat, indices=indices, spatial_shape=spatial_shape,
                                   batch_size=batch_size)

"""spconv's kernel-volume-1 arithmetic on plain tensors, importable without spconv (the classifiers need it)."""

from __future__ import annotations

import torch
from torch import nn


def pointwise(features: torch.Tensor, conv: nn.Module) -> torch.Tensor:
    """A kernel-volume-1 sparse conv (any module with spconv's ``weight`` (C_out, 1, 1, 1, C_in) and ``bias``)
    applied to plain features, exactly as spconv 2.x computes it.

    spconv reinterprets the stored weight as a row-major (C_in, C_out) matrix (spconv issue #450); the
    published checkpoints were trained with that, so we must do the same.
    """
    weight = conv.weight
    out = features @ weight.reshape(weight.shape[-1], weight.shape[0])
    if conv.bias is not None:
        out = out + conv.bias
    return out

"""Conv outputs with a spare zero row: the next conv gathers "missing" neighbours from it without a padded copy."""

from __future__ import annotations

import torch


def zero_row_buffer(rows: int, cols: int, dtype: torch.dtype, device) -> torch.Tensor:
    """An uninitialised (rows + 1, cols) buffer whose last row is zero: a conv output written into its
    first rows is its own padded input for the next conv (see `with_zero_row`)."""
    buf = torch.empty(rows + 1, cols, dtype=dtype, device=device)
    buf[rows].zero_()
    return buf


def with_zero_row(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(M, C) → (M + 1, C) in ``dtype`` with a zero last row, without a copy when x is already the
    leading rows of such a tensor (the outputs of `bucket_conv`, and in-place ReLUs / sums on them)."""
    base = x._base
    if (x.dtype == dtype and base is not None and base.dim() == 2 and base.is_contiguous() and x.is_contiguous()
            and base.shape == (x.shape[0] + 1, x.shape[1]) and base.data_ptr() == x.data_ptr()
            and not bool(base[-1].any())):
        return base
    padded = zero_row_buffer(x.shape[0], x.shape[1], dtype, x.device)
    padded[:-1].copy_(x)  # casts once (bf16) and pads in one pass
    return padded

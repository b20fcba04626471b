"""Mask-bucketed sparse convolution: rows that share a neighbour pattern run as one dense GEMM.

On a voxelised surface many rows of a table see the same few neighbour patterns (a wall row has the 9
in-plane taps of its plane): on the 1M-point cloud, 33 of 9,220 distinct 27-tap masks cover 78 % of the
level-0 rows. `mask_groups` puts each row in the smallest candidate bucket that covers its live taps (the
common exact masks and the kernel's axis slabs; its extra taps read a zero row). A conv is then, per bucket
and chunk of rows, one gather of the bucket's taps into an (n, t*C_in) operand and one
``(n, t*C_in) @ (t*C_in, C_out)`` GEMM straight into the output rows:

- no scatter and no per-pair buffers (each output row is written once, by one GEMM that reads a gathered
  chunk still in cache), so it is deterministic and each output is a single fp32 dot product;
- on the 1M cloud that costs ~10 % more multiply-adds than the valid pairs.

Rows whose bucket would gather too many zero rows (``max_ratio``: sparse, irregular surfaces such as the
130k-voxel room's level 0, ~5 live taps of 27) go last and run over valid pairs summed per row
(`model.engine.bags`). Measured (1 thread, CPU time, other jobs on the machine): 1M cloud level-0 96->96
conv 0.83 s vs 1.9 s over valid pairs with ``index_add_``; the 125-tap 6->32 stem over slab buckets 0.08 s
vs 0.14 s on the room. Chunks of ~2 MiB of gathered operand per thread keep it in L2 (1 thread: 0.83 s vs
1.03 s with 8 MiB chunks); the extra memory is one chunk and the outputs' spare zero row
(`zero_row_buffer`), which lets the next conv gather from them without a padded copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model.engine.bags import RowBags, bags_conv
from model.engine.rows import with_zero_row, zero_row_buffer

Group = tuple[list[int] | None, int]  # (tap ids of a bucket, or None: valid pairs; its rows)
CHUNK_BYTES_PER_THREAD = 2 << 20  # gathered operand per GEMM call and thread (fits a 2 MiB L2)
CHUNK_BYTES_GPU = 256 << 20  # on a GPU, few large launches (not measured on a GPU yet)
# Rows per step of `mask_groups`' coverage test: its (rows, taps) float operand stays in L2 (the room's 125-tap
# stem, whole mask_groups, 2 threads: 29-30 ms against 30-33 ms in steps of 65536 rows).
_CHUNK_ROWS = 8192


def min_bucket_rows(num_rows: int) -> int:
    """Rows a mask needs to get its own bucket (smaller buckets give slow, overhead-bound GEMMs)."""
    return max(128, num_rows // 256)


@dataclass
class Bucket:
    start: int  # first row of the bucket in `MaskBuckets.order`
    taps: torch.Tensor  # (t,) int64 tap ids of the bucket
    index: torch.Tensor  # (n, t) input row of every tap of every row (num_in = missing: the zero row)

    @property
    def rows(self) -> int:
        return self.index.shape[0]


@dataclass
class MaskBuckets:
    """The rows of one table (M_out, K) grouped by neighbour mask, derived once per table per forward and
    shared by every conv over it. ``order[i]``: the output row that bucket-ordered row i is."""

    num_out: int
    num_in: int
    num_taps: int
    order: torch.Tensor | None  # (M_out,) int64, or None: the rows are in table order
    buckets: list[Bucket]
    rest: RowBags | None = None  # the last rows (after every bucket), run over valid pairs

    @classmethod
    def from_table(cls, table: torch.Tensor, num_in: int, min_rows: int | None = None,
                   max_ratio: float | None = None) -> "MaskBuckets":
        """table (M_out, K) with ``num_in`` = missing, rows in any order (the conv writes its output back
        in table order). ``min_rows``, ``max_ratio``: see `mask_groups`; a ``min_rows`` above M_out gives
        one all-taps bucket in table order (a dense gather conv)."""
        m, taps = table.shape
        if min_rows is not None and min_rows > m:
            return cls(m, num_in, taps, None, [Bucket(0, torch.arange(taps, device=table.device), table)])
        order, groups = mask_groups(table, num_in, min_rows, max_ratio)
        return cls(m, num_in, taps, order, *_buckets(table.index_select(0, order), num_in, groups))

    @classmethod
    def from_grouped(cls, table: torch.Tensor, num_in: int, groups: list[Group]) -> "MaskBuckets":
        """A table already in bucket order (renumbered by `mask_groups`' order), so the conv's output is
        in that order too and needs no reordering."""
        m, taps = table.shape
        return cls(m, num_in, taps, None, *_buckets(table, num_in, groups))


def slab_masks(taps: int) -> torch.Tensor:
    """(S, taps) bool: the axis-aligned slabs of a cubic kernel through its centre, thickness 1, 3, ...
    below the full width, then the whole kernel (last). A row of a surface has its live taps in the plane
    (or, for a thick surface and a 5³ kernel, the 3-thick slab) along the surface."""
    k = round(taps ** (1 / 3))
    if k**3 != taps:
        raise ValueError(f"{taps} taps are not a cubic kernel")
    d = torch.arange(k) - k // 2
    i, j, l = torch.meshgrid(d, d, d, indexing="ij")
    slabs = [axis.abs().reshape(-1) <= r for r in range(k // 2) for axis in (i, j, l)]
    return torch.stack(slabs + [torch.ones(taps, dtype=torch.bool)])


def mask_groups(table: torch.Tensor, num_in: int, min_rows: int | None = None,
                max_ratio: float | None = None) -> tuple[torch.Tensor, list[Group]]:
    """Bucket order of a table's rows and the buckets as (taps, rows) pairs in that order.

    Candidate buckets: the axis slabs of the kernel (`slab_masks`, always there) and, for kernels of at
    most 62 taps, every exact mask of at least ``min_rows`` rows (None: `min_bucket_rows`). Each row joins the
    smallest candidate that covers its live taps (extra taps read the zero row), unless that candidate has
    more than ``max_ratio`` times the row's live taps: such rows come last, as one group with taps None,
    for valid pairs. ``order`` (M,) int64: bucket-major, rows in table order within a bucket (spatially
    local after the engine's level-0 order)."""
    m, taps = table.shape
    dev = table.device
    slabs = slab_masks(taps).to(dev)
    if taps <= 62:  # one row per distinct mask
        word = torch.int32 if taps <= 31 else torch.int64  # int32 for 3³ kernels: half the memory traffic
        bits = torch.bitwise_left_shift(torch.ones(taps, dtype=word, device=dev), torch.arange(taps, dtype=word, device=dev))
        mask = ((table != num_in) * bits).sum(dim=1, dtype=word)  # (M,) bitmask of live taps
        uniq, inverse, counts = torch.unique(mask, return_inverse=True, return_counts=True)
        live = (uniq[:, None] & bits) != 0  # (U, K)
        candidates = torch.cat([live[counts >= (min_rows or min_bucket_rows(m))], slabs])
    else:
        live, inverse, candidates = None, None, slabs
    size = candidates.sum(dim=1)
    by_size = torch.argsort(size, stable=True)  # the first candidate covering a row in this order is its smallest
    missed = (~candidates.index_select(0, by_size)).float().t()
    rows = m if live is None else len(live)
    choice = torch.empty(rows, dtype=torch.int64, device=dev)
    live_taps = torch.empty(rows, dtype=torch.int64, device=dev) if max_ratio is not None else None
    for a in range(0, rows, _CHUNK_ROWS):
        chunk = table[a : a + _CHUNK_ROWS] != num_in if live is None else live[a : a + _CHUNK_ROWS]
        covered = (chunk.float() @ missed) == 0  # (rows, C): candidates without a live tap outside them
        choice[a : a + _CHUNK_ROWS] = covered.byte().argmax(dim=1)  # the first (the whole kernel covers all)
        if live_taps is not None:
            live_taps[a : a + _CHUNK_ROWS] = chunk.sum(dim=1)
    choice = by_size.index_select(0, choice)
    if max_ratio is not None:  # too wasteful: valid pairs (group C, sorted last)
        choice[size.index_select(0, choice) > max_ratio * live_taps] = len(candidates)
    row_choice = choice if inverse is None else choice.index_select(0, inverse)
    order = torch.argsort(row_choice * m + torch.arange(m, device=dev))
    keys, sizes = torch.unique_consecutive(row_choice.index_select(0, order), return_counts=True)
    return order, [(torch.nonzero(candidates[c]).reshape(-1).tolist() if c < len(candidates) else None, n)
                   for c, n in zip(keys.tolist(), sizes.tolist())]


def _buckets(sorted_table: torch.Tensor, num_in: int, groups: list[Group]) -> tuple[list[Bucket], RowBags | None]:
    """The buckets of a table in bucket order, and the valid pairs of its trailing taps-None group."""
    taps, dev = sorted_table.shape[1], sorted_table.device
    out, rest, start = [], None, 0
    for tap_ids, n in groups:
        rows = sorted_table[start : start + n]
        if tap_ids is None:
            if start + n != sorted_table.shape[0]:
                raise ValueError("the valid-pairs group must come last")
            rest = RowBags.from_table(rows, num_in, submanifold=True, offset=start)  # centre: x[start + i]
        else:
            live = torch.tensor(tap_ids, dtype=torch.int64, device=dev)
            out.append(Bucket(start, live, rows if len(live) == taps else rows.index_select(1, live)))
        start += n
    return out, rest


def bucket_conv(x: torch.Tensor, plan: MaskBuckets, weight: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """``out[r] = bias + sum_k pad(x)[table[r, k]] @ W[k]``, one GEMM per bucket chunk (see the module).

    x: (M_in, C_in) float32 or bfloat16 (cast to the weight's dtype); weight: (K, C_in, C_out);
    bias: (C_out,) float32 or None. Returns (M_out, C_out) float32."""
    taps, c_in, c_out = weight.shape
    if plan.num_taps != taps:
        raise ValueError(f"the table has {plan.num_taps} taps but the weight has {taps}")
    if x.shape != (plan.num_in, c_in):
        raise ValueError(f"features have shape {tuple(x.shape)} but the conv expects ({plan.num_in}, {c_in})")
    padded = with_zero_row(x, weight.dtype) if plan.buckets else x  # row num_in: the missing neighbour
    x = padded[: plan.num_in]
    low = weight.dtype != torch.float32
    out_sorted = zero_row_buffer(plan.num_out, c_out, torch.float32, x.device)[: plan.num_out]
    budget = CHUNK_BYTES_PER_THREAD * max(1, torch.get_num_threads()) if x.device.type == "cpu" else CHUNK_BYTES_GPU
    for bucket in plan.buckets:
        t = len(bucket.taps)
        w = (weight if t == taps else weight.index_select(0, bucket.taps)).reshape(t * c_in, c_out)
        step = max(64, budget // (t * c_in * x.element_size()))
        for a in range(0, bucket.rows, step):
            b = min(a + step, bucket.rows)
            gathered = padded.index_select(0, bucket.index[a:b].reshape(-1)).view(b - a, t * c_in)
            dst = out_sorted[bucket.start + a : bucket.start + b]
            if low:  # bf16 operands: the product comes back in bf16, widened before any sum
                dst.copy_(gathered @ w)
                if bias is not None:
                    dst += bias
            elif bias is None:
                torch.mm(gathered, w, out=dst)
            else:
                torch.addmm(bias, gathered, w, out=dst)
    if plan.rest is not None:
        bags_conv(x, plan.rest, weight, bias, out=out_sorted[plan.num_out - plan.rest.num_out :])
    if plan.order is None:
        return out_sorted
    out = zero_row_buffer(plan.num_out, c_out, torch.float32, x.device)[: plan.num_out]
    return out.index_copy_(0, plan.order, out_sorted)

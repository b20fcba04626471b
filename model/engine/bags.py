"""Row-bag sparse convolution: per-tap GEMMs over the valid pairs, summed per output row by ``embedding_bag``.

The valid-pair conv (`model.engine.pairs`) adds each tap's products into the output with ``index_add_``:
one read-modify-write of an output row per pair, and on CPU a scatter kernel that walks the rows in
order. Here the output rows are cut into blocks; per block, every non-centre pair's input row is
gathered once (pairs in tap order, so each tap is one contiguous GEMM), the products of all taps, the
centre tap's product (identity rows of a submanifold table: no gather) and the bias land in one buffer,
and ``embedding_bag(mode="sum")`` sums each output row's "bag" of products — bias, centre, then the
other taps in tap order — and writes the row once. Same products and order of additions as
`pairs_conv` (bias + centre, then tap 0, 1, ...): equal to it up to float32 rounding (embedding_bag's
kernel may group its adds; measured ≤ 2.4e-7 on unit-scale features, often bit-identical); deterministic.

Measured on the 130k-voxel room (2 threads, one conv, 96 -> 96 channels): level 0 (~5 live taps of 27)
66 ms against 79 ms over valid pairs and 104 ms over mask buckets; level 1 (66,784 rows) 61 vs 69 / 72 ms.
A block's buffers (gathered inputs and products, ~6 live taps x rows x channels) stay a few MiB, so
they are reused from cache and the extra memory is one block's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model.engine.rows import zero_row_buffer

# Output rows per block on CPU (room, one 96-channel conv, blocks of 2048 / 8192 / 32768 rows: level 0
# 73 / 66 / 80 ms, level 1 61 / 67 / 75 ms). On a GPU few large launches, with products of ~10 taps x 96
# channels still ~0.5 GB (not measured on a GPU yet).
BLOCK_ROWS = 4096
BLOCK_ROWS_GPU = 1 << 17


@dataclass
class _Block:
    start: int  # first output row
    stop: int
    in_rows: torch.Tensor  # (P,) int64: input row of every non-centre pair, in tap order
    spans: list[tuple[int, int, int]]  # (tap, a, b): pairs a..b of in_rows belong to tap
    bag_index: torch.Tensor  # (P + n*(1 + centre),) int64 rows of the block's product buffer, row by row
    bag_offsets: torch.Tensor  # (n,) int64 start of each output row's bag in bag_index


@dataclass
class RowBags:
    """The valid pairs of one table (M_out, K), cut into blocks of output rows. ``centre``: the tap whose
    column is the identity (output row r reads input row r + ``offset``), computed without a gather; None
    when there is none."""

    num_out: int
    num_in: int
    num_taps: int
    centre: int | None
    blocks: list[_Block]
    offset: int = 0  # the centre tap of output row r reads input row r + offset

    @classmethod
    def from_table(cls, table: torch.Tensor, num_in: int, submanifold: bool = False, offset: int = 0,
                   block_rows: int | None = None) -> "RowBags":
        """table (M_out, K) with ``num_in`` = missing. ``submanifold``: the centre column of row r is input
        row r + ``offset`` (checked; if it is not, the centre is a tap like the others)."""
        m, taps = table.shape
        dev = table.device
        block_rows = block_rows or (BLOCK_ROWS if dev.type == "cpu" else BLOCK_ROWS_GPU)
        centre = taps // 2 if submanifold else None
        if centre is not None and not torch.equal(table[:, centre], torch.arange(offset, offset + m, device=dev, dtype=table.dtype)):
            centre = None
        if m == 0:
            return cls(0, num_in, taps, centre, [], offset if centre is not None else 0)
        num_blocks = (m + block_rows - 1) // block_rows
        valid = torch.zeros(num_blocks * block_rows, taps, dtype=torch.bool, device=dev)
        torch.ne(table, num_in, out=valid[:m])
        if centre is not None:
            valid[:, centre] = False
        blocked = valid.view(num_blocks, block_rows, taps)
        # pairs in GEMM order (block, then tap, then row) straight from nonzero: no sort
        block, tap, local = torch.nonzero(blocked.transpose(1, 2), as_tuple=True)
        row = block * block_rows + local
        in_rows = table[row, tap].long()
        tap_counts = blocked.sum(dim=1)  # (blocks, K)
        pairs_per_block = tap_counts.sum(dim=1)
        first_pair = torch.cumsum(pairs_per_block, 0) - pairs_per_block
        slot = torch.arange(len(row), device=dev) - first_pair.index_select(0, block)  # row in the block's buffer
        extra = 1 + (centre is not None)  # each bag starts with the bias row, then the centre product
        live_upto = torch.cumsum(valid[:m], dim=1, dtype=torch.int32)  # (M, K) live taps up to each tap
        lens = live_upto[:, -1].long() + extra
        bag_start = torch.cumsum(lens, 0) - lens
        rows = torch.arange(m, device=dev)
        row_block = rows // block_rows
        block_first_row = torch.arange(num_blocks, device=dev) * block_rows
        block_size = torch.clamp(m - block_first_row, max=block_rows)
        pairs_of_row_block = pairs_per_block.index_select(0, row_block)
        bag_index = torch.empty(int(lens.sum()), dtype=torch.int64, device=dev)
        bag_index[bag_start] = pairs_of_row_block + (block_size.index_select(0, row_block) if centre is not None else 0)
        if centre is not None:  # the centre products follow the block's pairs, one per row
            bag_index[bag_start + 1] = pairs_of_row_block + rows - row_block * block_rows
        rank = live_upto.view(-1).index_select(0, row * taps + tap)  # 1 + live taps before it: its place in the bag
        bag_index[bag_start.index_select(0, row) + (extra - 1) + rank] = slot
        first_bag = bag_start.index_select(0, block_first_row).tolist() + [len(bag_index)]
        pair_bounds = [0] + torch.cumsum(pairs_per_block, 0).tolist()
        blocks = []
        for b, (counts, s, n) in enumerate(zip(tap_counts.tolist(), block_first_row.tolist(), block_size.tolist())):
            spans, a = [], 0
            for k, c in enumerate(counts):
                if c:
                    spans.append((k, a, a + c))
                a += c
            blocks.append(_Block(s, s + n, in_rows[pair_bounds[b] : pair_bounds[b + 1]], spans,
                                 bag_index[first_bag[b] : first_bag[b + 1]], bag_start[s : s + n] - first_bag[b]))
        return cls(m, num_in, taps, centre, blocks, offset if centre is not None else 0)


def bags_conv(x: torch.Tensor, bags: RowBags, weight: torch.Tensor, bias: torch.Tensor | None = None,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """``out[r] = bias + sum_k x[table[r, k]] @ W[k]`` over the valid pairs (see the module).

    x: (M_in, C_in) float32 or bfloat16 (cast to the weight's dtype; bf16 products are widened to
    float32 before any sum); weight: (K, C_in, C_out); bias: (C_out,) float32 or None. Returns
    (M_out, C_out) float32: ``out`` if given, else the leading rows of a buffer with a spare zero row
    (see `zero_row_buffer`)."""
    taps, c_in, c_out = weight.shape
    if bags.num_taps != taps:
        raise ValueError(f"the table has {bags.num_taps} taps but the weight has {taps}")
    if x.shape != (bags.num_in, c_in):
        raise ValueError(f"features have shape {tuple(x.shape)} but the conv expects ({bags.num_in}, {c_in})")
    x = x if x.dtype == weight.dtype else x.to(weight.dtype)
    low = weight.dtype != torch.float32  # bf16: GEMM row counts pooled into few shapes (`_shape_class`)
    if out is None:
        out = zero_row_buffer(bags.num_out, c_out, torch.float32, x.device)[: bags.num_out]
    centre, offset = bags.centre, bags.offset
    for block in bags.blocks:
        n, p = block.stop - block.start, len(block.in_rows)
        rows = [(k, a, b - a if not low else _shape_class(b - a)) for k, a, b in block.spans]
        slack = max([a + r for _, a, r in rows], default=0) - p  # rows a rounded-up GEMM spills past the pairs
        products = torch.empty(p + (n if centre is not None else 0) + 1 + max(slack, 0), c_out,
                               dtype=torch.float32, device=x.device)
        gathered = torch.empty(p + max(slack, 0), c_in, dtype=x.dtype, device=x.device)
        torch.index_select(x, 0, block.in_rows, out=gathered[:p])
        for k, a, r in rows:  # in tap order: a spill lands on rows that a later tap, the centre or the bias overwrite
            _product_into(products[a : a + r], gathered[a : a + r], weight[k])
        if centre is not None:
            _product_into(products[p : p + n], x[offset + block.start : offset + block.stop], weight[centre])
        bias_row = products[p + (n if centre is not None else 0)]
        if bias is None:
            bias_row.zero_()
        else:
            bias_row.copy_(bias)
        out[block.start : block.stop] = F.embedding_bag(block.bag_index, products, block.bag_offsets, mode="sum")
    return out


def _product_into(dst: torch.Tensor, a: torch.Tensor, w: torch.Tensor) -> None:
    """``dst = a @ w`` with dst float32: straight into dst for float32 operands, widened from bf16 ones."""
    if a.dtype == torch.float32:
        torch.mm(a, w, out=dst)
    else:
        dst.copy_(a @ w)


def _shape_class(rows: int) -> int:
    """``rows`` rounded up to 4 significant bits (at most 1/8 more, 8 shapes per octave): oneDNN builds a
    bf16 GEMM kernel per shape (~0.2 ms each here, against ~35 us for the call), so per-tap row counts are
    pooled into few shapes."""
    shift = max(rows.bit_length() - 4, 0)
    return -(-rows >> shift) << shift

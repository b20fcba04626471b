"""Valid-pair sparse convolution: per tap, only the (output row, input row) pairs that exist.

A dense table (`model.sparse.kernel_maps`) lists all K taps of every output row, most pointing at the
"missing" zero row on surfaces (~5-9 of 27 live). `TapPairs` keeps, per tap, the rows that have a
neighbour and that neighbour's row; it is derived once per table (so once per UNet level) and shared by
every conv of the level. A conv is then, per tap, ``gather → GEMM with W[k] → index_add_`` into the
output; the centre tap of a submanifold table pairs every row with itself, so the output starts as
``x @ W[centre]`` with no indexing and no zero fill. On CPU ``index_add_`` adds the rows of one tap in
index order and the taps in a fixed order, so results are deterministic. An up (inverse k2s2) table gives
every output row exactly one pair: its products are copied into place (``index_copy_``), not added.

The engine uses this for the up convs (one pair per row); every other conv with valid pairs runs as row bags
(`model.engine.bags`: the same pairs summed per output row, no ``index_add_``), which the tests compare
with this reference.

Precision: ``"fp32"``, or ``"bf16"``: operands of every GEMM in bfloat16 (AMX / AVX512-BF16 on CPUs that
have them), products and sums in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PRECISIONS = ("fp32", "bf16")


@dataclass
class TapPairs:
    """The valid pairs of one table. ``out_rows[k]`` / ``in_rows[k]``: int64 row ids of tap k (None
    for the identity centre tap, recorded in ``centre``: output row r is input row r).
    ``num_out``: rows of the output."""

    num_out: int
    out_rows: list[torch.Tensor | None]
    in_rows: list[torch.Tensor | None]
    centre: int | None
    exclusive: bool = False  # every output row has exactly one pair (an up table): copied, not added

    @property
    def num_taps(self) -> int:
        return len(self.out_rows)

    @classmethod
    def from_table(cls, table: torch.Tensor, num_in: int, submanifold: bool = False) -> "TapPairs":
        """table (M_out, K) with ``num_in`` = missing. ``submanifold``: the centre column of row r is
        input row r (checked), so it needs no pairs."""
        m_out, taps = table.shape
        centre = taps // 2 if submanifold else None
        if centre is not None:
            rows = torch.arange(m_out, device=table.device, dtype=table.dtype)
            if not torch.equal(table[:, centre], rows):
                centre = None  # not an identity centre: treat it like any other tap
        valid = (table != num_in).t()  # (K, M_out)
        counts = valid.sum(dim=1).tolist()
        tap_row = torch.nonzero(valid)  # (P, 2) sorted by tap, then output row
        out_all = tap_row[:, 1]
        in_all = table.t()[tap_row[:, 0], tap_row[:, 1]].long()
        out_rows: list[torch.Tensor | None] = list(torch.split(out_all, counts))
        in_rows: list[torch.Tensor | None] = list(torch.split(in_all, counts))
        if centre is not None:
            out_rows[centre] = in_rows[centre] = None
        exclusive = centre is None and len(out_all) == m_out and bool((valid.sum(dim=0) == 1).all())
        return cls(m_out, out_rows, in_rows, centre, exclusive)


def _mm(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``a @ w`` in float32 (bf16 operands give a bf16 product; it is widened before any sum)."""
    out = a @ w
    return out if out.dtype == torch.float32 else out.float()


def pairs_conv(x: torch.Tensor, pairs: TapPairs, weight: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """``out[r] = bias + sum_k x[in_k] @ W[k]`` over the valid pairs of every tap.

    x: (M_in, C_in) float32, cast to the weight's dtype (bfloat16 weights: bf16 GEMMs, float32 sums);
    weight: (K, C_in, C_out); bias: (C_out,) float32 or None. Returns (num_out, C_out) float32."""
    taps, c_in, c_out = weight.shape
    if pairs.num_taps != taps:
        raise ValueError(f"pairs have {pairs.num_taps} taps but the weight has {taps}")
    if x.shape[1] != c_in:
        raise ValueError(f"features have {x.shape[1]} channels but the weight expects {c_in}")
    x = x if x.dtype == weight.dtype else x.to(weight.dtype)  # bf16: cast once per conv, not per tap
    if pairs.exclusive:  # one product per output row: index_copy_ (parallel), no zero fill, no accumulation
        out = torch.empty(pairs.num_out, c_out, dtype=torch.float32, device=x.device)
        for k in range(taps):
            if pairs.out_rows[k].numel():
                y = _mm(x.index_select(0, pairs.in_rows[k]), weight[k])
                out.index_copy_(0, pairs.out_rows[k], y if bias is None else y.add_(bias))
        return out
    if pairs.centre is not None:
        out = _mm(x[: pairs.num_out], weight[pairs.centre])
        if bias is not None:
            out += bias
    elif bias is not None:
        out = bias.expand(pairs.num_out, c_out).clone()
    else:
        out = torch.zeros(pairs.num_out, c_out, dtype=torch.float32, device=x.device)
    for k in range(taps):
        rows = pairs.out_rows[k]
        if rows is None or rows.numel() == 0:
            continue
        out.index_add_(0, rows, _mm(x.index_select(0, pairs.in_rows[k]), weight[k]))
    return out

"""CPU plans of the engine's "pairs" formulation: row orders per level, then one plan per table.

Rows of a level may be numbered in any order as long as every table agrees, so the tables are renumbered
(`renumber_level`) before any conv runs:

- level 0 comes in the caller's order (FNV-hash order for voxelised clouds: spatially random), which makes
  every gather of the largest level a cache miss; coarser levels are sorted by position, so ordering level-0
  rows by (parent row, tap) makes them spatially local;
- levels with at least `BUCKET_MIN_ROWS` rows are then put in mask-bucket order (`model.engine.buckets`),
  so each bucket's GEMM writes a contiguous slice of the output and nothing is scattered or reordered.

Plans: the stem mask-bucketed over the axis slabs of its 5³ kernel (its 6 input channels make per-tap
GEMMs tiny, so even 2-4x the live taps is faster than valid pairs; it reads the caller's rows in its own
bucket order and writes its output straight into the renumbered order), the submanifold convs of large
levels mask-bucketed with their too-sparse rows over valid pairs summed per row (`model.engine.bags`;
a level where those are most rows runs wholly on row bags),
those of small levels and the k2s2 down convs over row bags, the k2s2 up convs over valid pairs copied
into place (`model.engine.pairs`: one pair per output row).
"""

from __future__ import annotations

import torch

from model.engine.bags import RowBags
from model.engine.buckets import Group, MaskBuckets, mask_groups, min_bucket_rows
from model.engine.pairs import TapPairs

# 1M-point cloud, 1 thread: buckets 2.2x / 1.6x / 1.2x faster than valid pairs at 307k / 76k / 18k rows,
# but 1.5-2x slower at 4k and 1k rows of 256 channels, where too few rows share a mask.
BUCKET_MIN_ROWS = 8192
# A row whose bucket gathers more than this many times its live taps runs over valid pairs (row bags)
# instead. Whole engine, best of 3-4, 2 threads, limits 2.5 / 1.5 / 1.2 / all rows on bags: 130k-voxel
# room (level 0: ~5 live taps of 27 in scattered patterns) 1.49 / 1.40 / 1.38 / 1.36 s; 1M-point cloud
# (dense patterns) 2.56 / 2.57 / 2.55 / 2.84 s. 1 thread, 1.5 / 1.25: room 2.28 / 2.25 s, 1M 4.09 / 4.20 s.
MAX_GATHER_RATIO = 1.5
# With bf16 operands the GEMMs are cheap and the zero rows cost little: no limit. Room / 1M cloud, 2 threads,
# limits 1.5 / 2.5 / none: 1.06 / 0.95 / 0.87 s and 1.48 / - / 1.36 s.
MAX_GATHER_RATIO_BF16: float | None = None

# A large level whose rows go mostly to valid pairs anyway runs wholly on row bags (no bucket order):
# the room's level 0 (~5 live taps in scattered patterns) sends 81% of its rows there. Room, 2 threads,
# alternating runs, best of 7: 1.42-1.45 s bucketed, 1.37 s all bags; the 1M-point cloud keeps its
# buckets (2.64 / 2.61 s, noise). Judged first on every n-th row, about `PAIRS_SAMPLE_ROWS` of them (the room's
# level 0: ~2 ms instead of ~13 ms of mask groups for all rows), then, unless that says "mostly pairs", on all.
MAX_PAIRS_FRACTION = 0.5
PAIRS_SAMPLE_ROWS = 8192

Tables = tuple[torch.Tensor | None, list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]


def renumber_level(tables: Tables, level: int, perm: torch.Tensor) -> Tables:
    """The same tables with the rows of ``level`` renumbered: new row i = old row perm[i] (int64)."""
    stem, subm, down, up = tables[0], list(tables[1]), list(tables[2]), list(tables[3])
    m = subm[level].shape[0]
    inv = torch.empty(m + 1, dtype=subm[level].dtype, device=perm.device)
    inv[perm] = torch.arange(m, dtype=inv.dtype, device=perm.device)
    inv[m] = m  # "missing" stays missing

    def rows(t: torch.Tensor) -> torch.Tensor:
        return t.index_select(0, perm)

    def ids(t: torch.Tensor) -> torch.Tensor:
        return inv.index_select(0, t.reshape(-1)).view(t.shape)

    subm[level] = ids(rows(subm[level]))  # the stem table is left alone: see `cpu_plans`
    if level > 0:  # down[l-1]: rows of this level; up[l-1]: ids of this level
        down[level - 1], up[level - 1] = rows(down[level - 1]), ids(up[level - 1])
    if level < len(down):  # down[l]: ids of this level; up[l]: rows of this level
        down[level], up[level] = ids(down[level]), rows(up[level])
    return stem, subm, down, up


def _pairs_rows(groups: list[Group]) -> int:
    """Rows of a level's mask groups that go to valid pairs (the taps-None group, always last)."""
    return groups[-1][1] if groups and groups[-1][0] is None else 0


def _mostly_pairs(table: torch.Tensor, rows: int, max_ratio: float | None) -> bool:
    """Whether more than `MAX_PAIRS_FRACTION` of a level's rows go to valid pairs, judged on every n-th row (in
    the caller's order: for level 0 a spatially random sample) with the bucket threshold scaled to the sample."""
    step = max(1, rows // PAIRS_SAMPLE_ROWS)
    if step == 1 or max_ratio is None:
        return False  # small enough to judge on all rows; or no limit (bf16): no row goes to pairs
    sample = table[::step]
    _, groups = mask_groups(sample, rows, max(1, min_bucket_rows(rows) // step), max_ratio)
    return _pairs_rows(groups) > MAX_PAIRS_FRACTION * len(sample)


def cpu_plans(stem, subm, down, up, precision: str = "fp32") -> tuple[
        MaskBuckets, list[RowBags | MaskBuckets], list[RowBags], list[TapPairs], torch.Tensor | None]:
    """(stem plan, subm plans, down plans, up plans, new_id): level-0 rows are renumbered (input row r is
    new row ``new_id[r]``; None: unchanged), so ``out.index_select(0, new_id)`` gives a level-0 output in
    the caller's order. The stem plan alone reads the caller's rows (the input features need no
    reordering) and writes its output in the new order: its own bucket order is composed with the
    renumbering, which spares renumbering its 125-column table (~75 ms of ~3 s on the 130k-voxel room,
    1 thread). ``precision``: the engine's GEMM operands ("fp32" or "bf16"), which set how many zero rows
    a bucket may gather."""
    if stem is None:
        raise ValueError("the CPU plans need the stem table (it maps the caller's rows to the renumbered ones)")
    tables: Tables = (stem, list(subm), list(down), list(up))
    sizes = [t.shape[0] for t in subm]
    perm = None
    if len(subm) > 1:
        parent, tap = torch.min(up[0], dim=1)  # the parent is the only entry < M_1
        perm = torch.argsort(parent.long() * 8 + tap)
    groups: list[list[Group] | None] = []
    for level, rows in enumerate(sizes):
        order = g = None
        if rows >= BUCKET_MIN_ROWS:  # masks need the rows in their final order, not renumbered ids
            table = tables[1][level]
            ratio = MAX_GATHER_RATIO if precision == "fp32" else MAX_GATHER_RATIO_BF16
            if not _mostly_pairs(table, rows, ratio):
                order, g = mask_groups(table if level or perm is None else table.index_select(0, perm), rows,
                                       max_ratio=ratio)
                if _pairs_rows(g) > MAX_PAIRS_FRACTION * rows:  # mostly valid pairs: all of it
                    order = g = None
        if level == 0 and order is not None:
            perm = order if perm is None else perm.index_select(0, order)
        level_perm = perm if level == 0 else order
        if level_perm is not None:  # level 0 renumbered once, for both orders
            tables = renumber_level(tables, level, level_perm)
        groups.append(g)
    _, subm, down, up = tables
    stem_plan = MaskBuckets.from_table(stem, sizes[0])
    new_id = None
    if perm is not None:  # write the stem's rows straight into the new order
        new_id = torch.empty_like(perm)
        new_id[perm] = torch.arange(len(perm), device=perm.device)
        stem_plan.order = new_id if stem_plan.order is None else new_id.index_select(0, stem_plan.order)
    subm_plans = [RowBags.from_table(t, sizes[l], submanifold=True) if groups[l] is None
                  else MaskBuckets.from_grouped(t, sizes[l], groups[l]) for l, t in enumerate(subm)]
    return (stem_plan,
            subm_plans,
            [RowBags.from_table(t, sizes[l]) for l, t in enumerate(down)],
            [TapPairs.from_table(t, sizes[l + 1]) for l, t in enumerate(up)],
            new_id)

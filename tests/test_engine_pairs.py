"""The torch engine (model/engine): valid-pair convs match the official fixtures and the dense gather
formulation, bf16 stays close to fp32, and the CLI / Predictor choose it by default on CPU."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
import torch

from conftest import PONDER, fixture_dir, random_room
from model.checkpoint import load_checkpoint, read_official
from model.engine.encoder import EngineEncoder, SpconvEncoder
from model.engine import plans
from model.engine.bags import RowBags, bags_conv
from model.engine.buckets import MaskBuckets, bucket_conv, mask_groups
from model.engine.pairs import TapPairs, pairs_conv
from model.engine.plans import renumber_level
from model.engine.unet import SpUNetEngine
from model.inference import load_predictor
from model.pointcloud.cloud import PointCloud
from model.pointcloud.readers import read_point_cloud
from model.pointcloud.voxelize import voxelize
from model.sparse.gather_ops import gather_conv
from model.sparse.kernel_maps import build_kernel_maps

TOL = 1e-4
CASES = [  # fixture, condition, expected file, has a segmentation head
    ("spunet_v1m1_seg", None, "expected.npz", True),
    ("ppt_v1m3_seg", "ScanNet", "expected_scannet.npz", True),
    ("ppt_v1m3_seg", "S3DIS", "expected_s3dis.npz", True),
    ("ponder_render", "ScanNet", "expected.npz", False),
]

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def _cloud(name: str) -> PointCloud:
    return read_point_cloud(fixture_dir(name) / "input.npz")


@pytest.mark.parametrize("name,condition,expected_file,segments", CASES)
def test_pairs_engine_matches_the_official_outputs(name, condition, expected_file, segments):
    folder = fixture_dir(name)
    expected = np.load(folder / expected_file)
    predictor = load_predictor(folder / "checkpoint.pth", backend="torch")
    assert predictor.backend == "torch" and predictor.encoder.engine.formulation == "pairs"
    cloud = _cloud(name)
    features = predictor.features(cloud, condition).point_features()
    assert np.abs(features - expected["backbone_feat"]).max() <= TOL
    if segments:
        logits = predictor.segment(cloud, condition).logits
        assert np.abs(logits - expected["seg_logits"]).max() <= TOL


def test_pairs_equal_gather_on_a_batch_of_generated_rooms():
    sd = read_official(fixture_dir("ppt_v1m3_seg") / "checkpoint.pth")
    gather = SpUNetEngine.from_state_dict(sd, formulation="gather")
    pairs = SpUNetEngine.from_state_dict(sd, formulation="pairs")
    scenes = [voxelize(PointCloud(**random_room(8000, seed=s)).validate(), 0.02, ("color", "normal")) for s in (1, 2)]
    feat = np.concatenate([s.feat for s in scenes])
    grid = np.concatenate([s.grid_coord for s in scenes])
    batch = np.repeat([0, 1], [s.num_voxels for s in scenes])
    a = gather.run(feat, grid, batch, condition="S3DIS")
    b = pairs.run(feat, grid, batch, condition="S3DIS")
    for key in ("backbone_feat", "seg_logits"):
        assert np.abs(a[key] - b[key]).max() <= 1e-5 * max(1.0, float(np.abs(a[key]).max()))
    alone = pairs.run(scenes[1].feat, scenes[1].grid_coord, condition="S3DIS")  # scenes never interact
    assert np.abs(alone["backbone_feat"] - b["backbone_feat"][scenes[0].num_voxels:]).max() <= 1e-5


def _every_table_kind(seed: int, points: int):
    """Kernel maps of a random cloud, a generator, and (table, features, input rows, submanifold) of each
    table kind: the stem, a submanifold level, a k2s2 down and a k2s2 up table."""
    rng = np.random.default_rng(seed)
    grid = np.unique(rng.integers(0, 12, size=(points, 3)), axis=0)
    maps = build_kernel_maps(grid, num_levels=2, stem_kernel=5)
    m0, m1 = maps.num_sites
    g = torch.Generator().manual_seed(seed)
    x0, x1 = torch.randn(m0, 8, generator=g), torch.randn(m1, 8, generator=g)
    kinds = ((maps.stem, x0, m0, True), (maps.subm[0], x0, m0, True), (maps.down[0], x0, m0, False),
             (maps.up[0], x1, m1, False))
    return maps, g, kinds


def test_pairs_conv_equals_gather_conv_for_every_table_kind():
    maps, g, kinds = _every_table_kind(0, 600)
    for table, x, m_in, subm in kinds:
        w = torch.randn(table.shape[1], 8, 4, generator=g)
        pairs = TapPairs.from_table(table, m_in, submanifold=subm)
        assert (pairs.centre is not None) == subm
        assert pairs.exclusive == (table is maps.up[0])  # one parent per fine row: copied, not added
        ref = gather_conv(x, table, w)  # sums of up to 125 taps in another order: relative to their size
        assert torch.allclose(pairs_conv(x, pairs, w), ref, atol=1e-6 * max(1.0, float(ref.abs().max())))
    assert maps.subm[0].dtype == torch.int32


def test_row_bags_equal_gather_and_pairs_for_every_table_kind_and_block_size():
    """Row bags (per-block gather, per-tap GEMMs, one embedding_bag sum per output row) give the gather
    conv's result for every table kind, with blocks that split rows anywhere (a partial last block, blocks
    with taps missing), and add in `pairs_conv`'s order: bias + centre, then the taps in order."""
    maps, g, kinds = _every_table_kind(2, 700)
    (_, x0, m0, _) = kinds[1]
    for table, x, m_in, subm in kinds:
        w, bias = torch.randn(table.shape[1], 8, 4, generator=g), torch.randn(4, generator=g)
        expected = gather_conv(x, table, w)
        tol = 1e-6 * max(1.0, float(expected.abs().max()))  # another summation order than the gather conv's
        pairs = TapPairs.from_table(table, m_in, submanifold=subm)
        for block_rows in (7, 64, None):
            bags = RowBags.from_table(table, m_in, submanifold=subm, block_rows=block_rows)
            assert (bags.centre is not None) == subm
            assert sum(b.stop - b.start for b in bags.blocks) == table.shape[0]
            assert torch.allclose(bags_conv(x, bags, w), expected, atol=tol)
            assert torch.allclose(bags_conv(x, bags, w, bias), expected + bias, atol=tol)
            assert torch.allclose(bags_conv(x, bags, w, bias), pairs_conv(x, pairs, w, bias), rtol=0, atol=1e-6)
            low = bags_conv(x, bags, w.bfloat16(), bias)  # bf16 products, float32 sums
            assert low.dtype == torch.float32
            assert torch.allclose(low, pairs_conv(x, pairs, w.bfloat16(), bias), atol=1e-6)
    rows = maps.subm[0][5:300]  # a slice of rows whose centre reads input row r + 5 (a bucket's trailing rows)
    bags = RowBags.from_table(rows, m0, submanifold=True, offset=5, block_rows=32)
    assert bags.centre is not None and bags.offset == 5
    w = torch.randn(27, 8, 4, generator=g)
    ref = gather_conv(x0, maps.subm[0], w)[5:300]
    assert torch.allclose(bags_conv(x0, bags, w), ref, atol=1e-6 * max(1.0, float(ref.abs().max())))
    with pytest.raises(ValueError, match="expects"):
        bags_conv(x0[:-1], bags, w)
    empty = RowBags.from_table(maps.subm[0][:0], 0, submanifold=True)  # no rows: no blocks, an empty output
    assert empty.blocks == [] and bags_conv(x0[:0], empty, w).shape == (0, 4)


def test_bucket_conv_equals_gather_conv_with_buckets_merges_and_pairs():
    """Mask buckets (exact masks, slabs, the all-taps fallback), the too-sparse rows over valid pairs, rows
    written back in table order or left in bucket order after renumbering: all the gather conv's result."""
    rng = np.random.default_rng(1)
    plane = np.c_[rng.integers(0, 40, (900, 2)), np.zeros((900, 1), dtype=np.int64)]  # a floor: 9-tap masks
    grid = np.unique(np.concatenate([plane, rng.integers(0, 14, size=(500, 3))]), axis=0)
    maps = build_kernel_maps(grid, num_levels=2, stem_kernel=5)
    m0 = maps.num_sites[0]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(m0, 8, generator=g)
    for table in (maps.stem, maps.subm[0]):
        w, bias = torch.randn(table.shape[1], 8, 4, generator=g), torch.randn(4, generator=g)
        expected = gather_conv(x, table, w) + bias
        for options in ({}, {"min_rows": 8}, {"min_rows": 8, "max_ratio": 1.5}, {"min_rows": m0 + 1}):
            plan = MaskBuckets.from_table(table, m0, **options)
            if "max_ratio" in options:
                assert plan.rest is not None and plan.buckets
            assert torch.allclose(bucket_conv(x, plan, w, bias), expected, atol=1e-5)
        order, groups = mask_groups(table, m0, min_rows=8, max_ratio=1.5)  # the engine's renumbered path
        renumbered = renumber_level((None, [table], [], []), 0, order)[1][0]
        plan = MaskBuckets.from_grouped(renumbered, m0, groups)
        assert plan.order is None and plan.rest is not None and plan.rest.centre is not None
        out = bucket_conv(x.index_select(0, order), plan, w, bias)
        assert torch.allclose(out, expected.index_select(0, order), atol=1e-5)


def test_mostly_pairs_is_judged_on_a_sample_like_on_all_rows(monkeypatch):
    """A floor (9-tap masks: buckets) is not "mostly pairs", a scattered cloud (few live taps in irregular
    patterns) is; the sample of every n-th row says what all rows say."""
    rng = np.random.default_rng(2)
    floor = np.c_[np.stack(np.meshgrid(np.arange(120), np.arange(120)), -1).reshape(-1, 2), np.zeros(14400, np.int64)]
    scattered = np.unique(rng.integers(0, 60, size=(20000, 3)), axis=0)  # ~9% of a 60³ grid: 2-3 live taps a row
    monkeypatch.setattr(plans, "PAIRS_SAMPLE_ROWS", 512)
    for grid, expected in ((floor, False), (scattered, True)):
        table = build_kernel_maps(grid, num_levels=1, stem_kernel=None).subm[0]
        rows = table.shape[0]
        _, groups = mask_groups(table, rows, max_ratio=1.5)
        assert (plans._pairs_rows(groups) > plans.MAX_PAIRS_FRACTION * rows) == expected
        assert rows // 512 > 1 and plans._mostly_pairs(table, rows, 1.5) == expected


@pytest.mark.parametrize("pairs_fraction, sample_rows", [(1.0, 8192), (0.0, 8192), (1.0, 64), (0.0, 64)])
def test_engine_with_every_level_bucketed_or_on_bags_equals_gather(monkeypatch, pairs_fraction, sample_rows):
    """Renumbering every level into bucket order (tables, level-0 permutation, zero-row buffers) changes
    nothing: force buckets on the small levels of a batch of generated rooms (fraction 1), or send every
    level with any valid-pair rows wholly to row bags (fraction 0), judged on all rows or first on a sample
    (64 rows: every n-th row of the larger levels)."""
    monkeypatch.setattr(plans, "BUCKET_MIN_ROWS", 1)
    monkeypatch.setattr(plans, "MAX_GATHER_RATIO", 1.5)
    monkeypatch.setattr(plans, "MAX_PAIRS_FRACTION", pairs_fraction)
    monkeypatch.setattr(plans, "PAIRS_SAMPLE_ROWS", sample_rows)
    sd = read_official(fixture_dir("spunet_v1m1_seg") / "checkpoint.pth")
    gather = SpUNetEngine.from_state_dict(sd, formulation="gather")
    pairs = SpUNetEngine.from_state_dict(sd, formulation="pairs")
    scenes = [voxelize(PointCloud(**random_room(8000, seed=s)).validate(), 0.02, ("color", "normal")) for s in (3, 4)]
    feat = np.concatenate([s.feat for s in scenes])
    grid = np.concatenate([s.grid_coord for s in scenes])
    batch = np.repeat([0, 1], [s.num_voxels for s in scenes])
    tables, levels = pairs.kernel_maps(torch.as_tensor(grid), torch.as_tensor(batch)).tables(), pairs.num_levels
    subm_plans = plans.cpu_plans(tables[0], tables[1 : 1 + levels], tables[1 + levels : 2 * levels],
                                 tables[2 * levels : 3 * levels - 1])[1]
    assert {type(p) for p in subm_plans} == {MaskBuckets if pairs_fraction == 1.0 else RowBags}
    a, b = gather.run(feat, grid, batch), pairs.run(feat, grid, batch)
    for key in ("backbone_feat", "seg_logits"):
        assert np.abs(a[key] - b[key]).max() <= 1e-5 * max(1.0, float(np.abs(a[key]).max()))
    again = pairs.run(feat, grid, batch)  # deterministic: no accumulation order depends on threads
    assert np.array_equal(again["backbone_feat"], b["backbone_feat"])


def test_bf16_stays_close_to_fp32():
    model = load_checkpoint(fixture_dir("ppt_v1m3_seg") / "checkpoint.pth")
    voxels = voxelize(_cloud("ppt_v1m3_seg"), model.config.grid_size, model.config.input_features)
    (fp32,) = EngineEncoder.from_loaded(model, "cpu").encode([voxels], "ScanNet")
    (bf16,) = EngineEncoder.from_loaded(model, "cpu", precision="bf16").encode([voxels], "ScanNet")
    cosine = (fp32 * bf16).sum(1) / (np.linalg.norm(fp32, axis=1) * np.linalg.norm(bf16, axis=1))
    assert cosine.mean() > 0.99 and np.quantile(cosine, 0.01) > 0.95


def test_default_backend_on_cpu_is_the_torch_engine():
    folder = fixture_dir("spunet_v1m1_seg")
    predictor = load_predictor(folder / "checkpoint.pth")
    assert predictor.backend == "torch" and isinstance(predictor.encoder, EngineEncoder)
    spconv = load_predictor(folder / "checkpoint.pth", backend="spconv")
    assert spconv.backend == "spconv" and isinstance(spconv.encoder, SpconvEncoder)
    from spconv.pytorch import ConvAlgo
    from spconv.pytorch.conv import SparseConvolution

    algos = {m.algo for m in spconv.model.modules() if isinstance(m, SparseConvolution)}
    assert algos == {ConvAlgo.Native}  # chosen when the model was placed on the CPU
    with pytest.raises(ValueError, match="bf16"):
        load_predictor(folder / "checkpoint.pth", backend="spconv", precision="bf16")


def test_cli_backends_spconv_and_torch_agree(tmp_path):
    folder = fixture_dir("spunet_v1m1_seg")
    expected = np.load(folder / "expected.npz")
    outputs = {}
    for backend in ("spconv", "torch", None):
        out = tmp_path / f"{backend}.npy"
        args = [PONDER, "features", str(folder / "input.npz"), "-o", str(out), "--checkpoint",
                str(folder / "checkpoint.pth")] + (["--backend", backend] if backend else [])
        result = subprocess.run(args, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        outputs[backend] = np.load(out)
    assert np.abs(outputs["spconv"] - outputs["torch"]).max() <= TOL
    assert np.array_equal(outputs[None], outputs["torch"])  # no --backend = the torch engine on CPU
    assert np.abs(outputs["torch"] - expected["backbone_feat"]).max() <= TOL
    bad = subprocess.run([PONDER, "features", str(folder / "input.npz"), "-o", str(tmp_path / "x.npy"),
                          "--backend", "spconv", "--precision", "bf16"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "bf16" in bad.stderr

"""Kernel maps and gather convs: structure of the tables, and numerical parity with spconv itself."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.sparse.gather_ops import (
    conv1x1,
    conv1x1_from_spconv,
    gather_conv,
    inverse_conv,
    taps_from_spconv,
)
from model.sparse import kernel_maps as km
from model.sparse.kernel_maps import KernelMapError, build_kernel_maps, table_names

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _random_sites(rng: np.random.Generator, n: int, extent: int, scenes: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Unique (batch, x, y, z) sites: a random blob per scene, rows shuffled across scenes."""
    rows = []
    for b in range(scenes):
        pts = np.unique(rng.integers(0, extent, size=(n, 3)), axis=0)
        rows.append(np.concatenate([np.full((len(pts), 1), b), pts], axis=1))
    sites = np.concatenate(rows)[rng.permutation(sum(len(r) for r in rows))]
    return sites[:, 1:].astype(np.int64), sites[:, 0].astype(np.int64)


def _brute_subm(coord: np.ndarray, batch: np.ndarray, k: int) -> np.ndarray:
    lookup = {(int(b), *map(int, p)): i for i, (b, p) in enumerate(zip(batch, coord))}
    m, c = len(coord), k // 2
    table = np.full((m, k**3), m, dtype=np.int64)
    for r in range(m):
        for f in range(k**3):
            d = (f // (k * k) - c, (f // k) % k - c, f % k - c)
            key = (int(batch[r]), *(int(coord[r, a] + d[a]) for a in range(3)))
            table[r, f] = lookup.get(key, m)
    return table


def test_subm_table_matches_brute_force_and_keeps_scenes_apart():
    rng = np.random.default_rng(0)
    coord, batch = _random_sites(rng, 300, 9, scenes=2)
    maps = build_kernel_maps(coord, batch, num_levels=3)
    assert maps.num_sites[0] == len(coord)
    np.testing.assert_array_equal(maps.stem.numpy(), _brute_subm(coord, batch, 5))
    np.testing.assert_array_equal(maps.subm[0].numpy(), _brute_subm(coord, batch, 3))
    for level in (1, 2):
        c = maps.coords[level].numpy()
        np.testing.assert_array_equal(maps.subm[level].numpy(), _brute_subm(c[:, 1:], c[:, 0], 3))
    # every neighbour lies in the same scene
    t = maps.subm[0].numpy()
    valid = t < len(coord)
    rows = np.nonzero(valid)[0]
    assert (batch[t[valid]] == batch[rows]).all()


def test_down_and_up_maps_are_consistent():
    rng = np.random.default_rng(1)
    coord, batch = _random_sites(rng, 500, 12, scenes=2)
    maps = build_kernel_maps(coord, batch, num_levels=3, stem_kernel=None)
    assert maps.stem is None and maps.table_names() == table_names(3, with_stem=False)
    fine = maps.coords[0].numpy()
    coarse = maps.coords[1].numpy()
    # coarse sites = distinct (b, floor(p/2)), sorted by key, hence in lexicographic (b, x, y, z) order
    expected = np.unique(np.concatenate([batch[:, None], coord // 2], axis=1), axis=0)
    np.testing.assert_array_equal(coarse, expected)
    down, up = maps.down[0].numpy(), maps.up[0].numpy()
    m_f, m_c = len(fine), len(coarse)
    assert down.shape == (m_c, 8) and up.shape == (m_f, 8)
    tap = 4 * (coord[:, 0] % 2) + 2 * (coord[:, 1] % 2) + coord[:, 2] % 2
    parent = up[np.arange(m_f), tap]
    np.testing.assert_array_equal(coarse[parent, 1:], coord // 2)
    np.testing.assert_array_equal(coarse[parent, 0], batch)
    assert ((up < m_c).sum(axis=1) == 1).all()
    np.testing.assert_array_equal(down[parent, tap], np.arange(m_f))
    assert (down < m_f).sum() == m_f  # every fine site feeds exactly one coarse tap


def test_bad_input_raises_clear_errors():
    with pytest.raises(KernelMapError, match="shape"):
        build_kernel_maps(np.zeros((4, 2), dtype=np.int64))
    with pytest.raises(KernelMapError, match="integer"):
        build_kernel_maps(np.zeros((4, 3), dtype=np.float32))
    with pytest.raises(KernelMapError, match="non-negative"):
        build_kernel_maps(np.array([[0, -1, 0]]))
    with pytest.raises(KernelMapError, match="duplicate"):
        build_kernel_maps(np.array([[1, 2, 3], [0, 0, 0], [1, 2, 3]]))
    # the same voxel in two different scenes is fine
    build_kernel_maps(np.array([[1, 2, 3], [1, 2, 3]]), np.array([0, 1]))
    with pytest.raises(KernelMapError, match="no rows"):
        build_kernel_maps(np.zeros((0, 3), dtype=np.int64))


def test_bad_torch_input_and_ranges_raise_clear_errors(monkeypatch):
    with pytest.raises(KernelMapError, match="integer"):
        build_kernel_maps(torch.zeros((4, 3)))
    with pytest.raises(KernelMapError, match="integer"):
        build_kernel_maps(torch.zeros((4, 3), dtype=torch.bool))
    with pytest.raises(KernelMapError, match="batch must be an integer"):
        build_kernel_maps(torch.zeros((1, 3), dtype=torch.int32), torch.zeros(1))
    with pytest.raises(KernelMapError, match="batch must have shape"):
        build_kernel_maps(torch.zeros((2, 3), dtype=torch.int32), np.zeros(3, dtype=np.int64))
    with pytest.raises(KernelMapError, match="batch indices must be non-negative"):
        build_kernel_maps(np.array([[0, 0, 0]]), np.array([-1]))
    with pytest.raises(KernelMapError, match="non-negative"):
        build_kernel_maps(torch.tensor([[3, 0, -2]]))
    # keys are int64: an extent whose cells overflow them is refused, not wrapped
    with pytest.raises(KernelMapError, match="too large"):
        build_kernel_maps(np.array([[0, 0, 0], [2**21, 2**21, 2**21]]))
    # only the bounding box counts: a small scene far from the origin is fine
    far = build_kernel_maps(np.array([[2**40, 2**40, 2**40], [2**40, 2**40, 2**40 + 1]]), num_levels=2)
    assert far.subm[0][0, 14].item() == 1 and far.coords[1][0, 1].item() == 2**39
    # int32 tables cannot hold more rows than MAX_ROWS (checked before any work)
    monkeypatch.setattr(km, "MAX_ROWS", 3)
    with pytest.raises(KernelMapError, match="int32"):
        build_kernel_maps(np.arange(12).reshape(4, 3))


def test_onnx_inputs_and_to():
    rng = np.random.default_rng(2)
    coord, _ = _random_sites(rng, 200, 10)
    maps = build_kernel_maps(coord, num_levels=5)
    inputs = maps.onnx_inputs()
    assert list(inputs) == table_names(5)
    assert all(a.dtype == np.int32 for a in inputs.values())
    assert maps.to("cpu").num_sites == maps.num_sites


def test_tables_are_int32_on_the_input_device():
    rng = np.random.default_rng(4)
    coord, batch = _random_sites(rng, 300, 10, scenes=2)
    for grid_coord, b in ((coord, batch), (torch.from_numpy(coord).int(), torch.from_numpy(batch))):
        maps = build_kernel_maps(grid_coord, b, num_levels=4)
        assert all(t.dtype == torch.int32 and t.device.type == "cpu" for t in maps.tables())
        assert all(c.dtype == torch.int64 and c.device.type == "cpu" for c in maps.coords)
        assert maps.stem.is_contiguous() and all(t.is_contiguous() for t in maps.tables())
    # int32 and int64 tables give the same convs
    feat, w = torch.randn(len(coord), 6), torch.randn(27, 6, 5)
    assert torch.equal(gather_conv(feat, maps.subm[0], w), gather_conv(feat, maps.subm[0].long(), w))
    coarse, w_up = torch.randn(maps.num_sites[1], 4), torch.randn(8, 4, 3)
    assert torch.equal(inverse_conv(coarse, maps.up[0], w_up), inverse_conv(coarse, maps.up[0].long(), w_up))


def _assert_same_maps(a, b) -> None:
    assert a.num_sites == b.num_sites
    for x, y in zip(a.tables() + a.coords, b.tables() + b.coords):
        assert x.dtype == y.dtype and torch.equal(x.cpu(), y.cpu())


@pytest.mark.parametrize("stem_kernel", [5, 3, None])
def test_sorted_fallback_equals_dense_grid(stem_kernel):
    """A zero grid budget forces the sorted-key lookup; it must give the dense grid's tables exactly."""
    rng = np.random.default_rng(5)
    coord, batch = _random_sites(rng, 2000, 20, scenes=3)
    dense = build_kernel_maps(coord, batch, num_levels=4, stem_kernel=stem_kernel)
    sparse = build_kernel_maps(coord, batch, num_levels=4, stem_kernel=stem_kernel, grid_budget=0)
    _assert_same_maps(dense, sparse)
    np.testing.assert_array_equal(dense.subm[0].numpy(), _brute_subm(coord, batch, 3))
    with pytest.raises(KernelMapError, match="1 duplicate"):
        build_kernel_maps(np.concatenate([coord, coord[7:8]]), np.concatenate([batch, batch[7:8]]), grid_budget=0)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("budget", [None, 0])
def test_cuda_equals_cpu(budget):
    rng = np.random.default_rng(6)
    coord, batch = _random_sites(rng, 20000, 40, scenes=2)
    cpu = build_kernel_maps(coord, batch, grid_budget=budget)
    gpu = build_kernel_maps(torch.from_numpy(coord).cuda(), torch.from_numpy(batch).cuda(), grid_budget=budget)
    assert all(t.device.type == "cuda" for t in gpu.tables() + gpu.coords)
    _assert_same_maps(cpu, gpu)
    with pytest.raises(KernelMapError, match="duplicate"):
        build_kernel_maps(torch.from_numpy(np.concatenate([coord, coord[:1]])).cuda(), grid_budget=budget)


def test_large_cloud_tables_are_symmetric_and_paths_agree():
    """100k voxels of a room's surfaces (several grid chunks): every neighbour relation holds both ways
    (q is p's neighbour at d iff p is q's at -d), and the sorted-key fallback gives the same tables."""
    rng = np.random.default_rng(3)
    side = 330
    u = rng.integers(0, side, size=(150_000, 3))
    u[np.arange(len(u)), rng.integers(0, 3, len(u))] = 0  # on three walls
    coord = np.unique(u, axis=0)[rng.permutation(len(np.unique(u, axis=0)))]
    maps = build_kernel_maps(coord)
    m = len(coord)
    assert maps.num_sites[0] == m and maps.stem.shape == (m, 125)
    assert maps.num_sites[-1] < maps.num_sites[1] < maps.num_sites[0]
    stem = maps.stem.long()
    rows, taps = torch.nonzero(stem < m, as_tuple=True)
    assert torch.equal(stem[stem[rows, taps], 124 - taps], rows)
    assert (stem[:, 62] == torch.arange(m)).all()
    _assert_same_maps(maps, build_kernel_maps(coord, grid_budget=0))


# ---- parity with spconv (ConvAlgo.Native on CPU) -------------------------------------------------

try:  # only the parity tests below need spconv; the brute-force tests above run without it
    import spconv.pytorch as spconv
    from spconv.pytorch import ConvAlgo
except ImportError:
    spconv = ConvAlgo = None
needs_spconv = pytest.mark.skipif(spconv is None, reason="spconv is not installed (pip install spconv-cu120)")


def _sparse_tensor(feat, coord, batch):
    indices = torch.from_numpy(np.concatenate([batch[:, None], coord], axis=1)).int()
    shape = (coord.max(0) + 8).tolist()
    return spconv.SparseConvTensor(feat, indices, shape, int(batch.max()) + 1)


def _init_unit(conv) -> None:
    """Weights with std 1/sqrt(fan-in), so outputs are O(1) and 1e-5 is a meaningful absolute bound."""
    fan_in = conv.weight[0].numel()
    torch.nn.init.normal_(conv.weight, std=fan_in**-0.5)


def _row_index(coords: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """Row of `coords` (M, 4) holding each (b, x, y, z) of `indices`."""
    lookup = {tuple(map(int, c)): i for i, c in enumerate(coords)}
    return np.array([lookup[tuple(map(int, r))] for r in indices])


@needs_spconv
@pytest.mark.parametrize("kernel", [3, 5])
def test_subm_conv_matches_spconv(kernel):
    rng = np.random.default_rng(10 + kernel)
    coord, batch = _random_sites(rng, 400, 10, scenes=2)
    maps = build_kernel_maps(coord, batch, num_levels=1, stem_kernel=5)
    conv = spconv.SubMConv3d(7, 5, kernel, padding=1, bias=False, algo=ConvAlgo.Native)
    _init_unit(conv)
    feat = torch.randn(len(coord), 7)
    with torch.no_grad():
        ref = conv(_sparse_tensor(feat, coord, batch))
        table = maps.stem if kernel == 5 else maps.subm[0]
        out = gather_conv(feat, table, taps_from_spconv(conv.weight))
    assert torch.equal(ref.indices[:, 1:].long(), torch.from_numpy(coord))  # subm keeps row order
    assert (out - ref.features).abs().max().item() <= 1e-5


@needs_spconv
def test_down_and_inverse_conv_match_spconv():
    rng = np.random.default_rng(20)
    coord, batch = _random_sites(rng, 600, 14, scenes=2)
    maps = build_kernel_maps(coord, batch, num_levels=2, stem_kernel=None)
    down = spconv.SparseConv3d(6, 8, 2, stride=2, bias=False, indice_key="s1", algo=ConvAlgo.Native)
    up = spconv.SparseInverseConv3d(8, 4, 2, bias=False, indice_key="s1", algo=ConvAlgo.Native)
    _init_unit(down)
    _init_unit(up)
    feat = torch.randn(len(coord), 6)
    with torch.no_grad():
        coarse_ref = down(_sparse_tensor(feat, coord, batch))
        fine_ref = up(coarse_ref)
        # spconv orders coarse rows by its hash; ours are sorted by key
        rows = torch.from_numpy(_row_index(maps.coords[1].numpy(), coarse_ref.indices.long().numpy()))
        coarse = gather_conv(feat, maps.down[0], taps_from_spconv(down.weight))
        assert len(rows) == maps.num_sites[1]
        assert (coarse[rows] - coarse_ref.features).abs().max().item() <= 1e-5
        w_up = taps_from_spconv(up.weight)
        ours_in = torch.empty_like(coarse)
        ours_in[rows] = coarse_ref.features  # identical input for the inverse conv
        fine_gather = gather_conv(ours_in, maps.up[0], w_up)
        fine_fast = inverse_conv(ours_in, maps.up[0], w_up)
    assert torch.equal(fine_ref.indices[:, 1:].long(), torch.from_numpy(coord))  # fine order restored
    assert (fine_gather - fine_ref.features).abs().max().item() <= 1e-5
    assert (fine_fast - fine_ref.features).abs().max().item() <= 1e-5


@needs_spconv
def test_conv1x1_follows_spconv_quirk():
    rng = np.random.default_rng(30)
    coord, batch = _random_sites(rng, 100, 8)
    conv = spconv.SubMConv3d(6, 4, 1, bias=False, algo=ConvAlgo.Native)
    _init_unit(conv)
    feat = torch.randn(len(coord), 6)
    with torch.no_grad():
        ref = conv(_sparse_tensor(feat, coord, batch)).features
        assert (conv1x1(feat, conv.weight) - ref).abs().max().item() <= 1e-5
        assert (conv1x1(feat, conv1x1_from_spconv(conv.weight)) - ref).abs().max().item() <= 1e-5
        usual = feat @ conv.weight[:, 0, 0, 0, :].t()
    assert (usual - ref).abs().max().item() > 1e-2  # the "usual" contraction is not what spconv does
    with pytest.raises(ValueError, match="conv1x1"):
        taps_from_spconv(conv.weight)

"""What a GPU host must get right: the official fixtures through the torch engine on CUDA (kernel maps
built on the GPU), CUDA kernel maps equal to the CPU ones, and spconv's CUDA path. All marked ``gpu``;
they skip without a CUDA GPU. bench/gpu_check.sh runs this file on the GPU host (its spconv from the
carried bundle; ``PONDER_GPU_SPCONV=0`` there when spconv could not be imported).

Only numpy, torch and the model's spconv-free modules are imported at the top, so the file runs on a GPU
image that lacks spconv and the service's packages."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from model.engine.unet import SpUNetEngine
from model.pointcloud.cloud import PointCloud
from model.pointcloud.voxelize import VoxelizedCloud, voxelize
from model.sparse.kernel_maps import build_kernel_maps
from conftest import fixture_dir

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CASES = [("spunet_v1m1_seg", None, "expected.npz"), ("ppt_v1m3_seg", "ScanNet", "expected_scannet.npz"),
         ("ppt_v1m3_seg", "S3DIS", "expected_s3dis.npz")]
CUDA = torch.device("cuda")


def _official_state(path: Path) -> dict[str, torch.Tensor]:
    """An official checkpoint's state_dict without importing model.checkpoint (which needs spconv);
    allow-lists the numpy scalar the official trainer stores, under numpy 1 and numpy 2 names."""
    if np.lib.NumpyVersion(np.__version__) >= "2.0.0":  # the pickle names numpy.core, moved to numpy._core
        allowed: list = [np.dtype, (np._core.multiarray.scalar, "numpy.core.multiarray.scalar")]
    else:
        allowed = [np.dtype, np.core.multiarray.scalar]
    allowed += [getattr(np.dtypes, n) for n in ("Float64DType", "Float32DType", "Int64DType") if hasattr(np.dtypes, n)]
    with torch.serialization.safe_globals(allowed):
        state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    return {k.removeprefix("module."): v for k, v in state.items()}


def _fixture(name: str, expected_file: str) -> tuple[VoxelizedCloud, dict[str, np.ndarray], dict[str, torch.Tensor]]:
    folder = fixture_dir(name)
    inp, expected = np.load(folder / "input.npz"), np.load(folder / expected_file)
    voxels = voxelize(PointCloud(inp["coord"], inp["color"], inp["normal"]))
    return voxels, dict(expected), _official_state(folder / "checkpoint.pth")


@pytest.mark.parametrize("formulation", ["gather", "pairs"])
@pytest.mark.parametrize("name,condition,expected_file", CASES)
def test_engine_fixture_parity_on_cuda(name, condition, expected_file, formulation):
    voxels, expected, sd = _fixture(name, expected_file)
    engine = SpUNetEngine.from_state_dict(sd, formulation=formulation).to(CUDA)
    out = engine.run(voxels.feat, voxels.grid_coord, condition=condition)  # kernel maps built on the GPU
    p = voxels.point_to_voxel
    assert np.abs(out["backbone_feat"][p] - expected["backbone_feat"]).max() < 1e-4
    assert np.abs(out["seg_logits"][p] - expected["seg_logits"]).max() < 1e-4


def test_engine_bf16_on_cuda_is_close_to_fp32():
    voxels, _, sd = _fixture("spunet_v1m1_seg", "expected.npz")
    ref = SpUNetEngine.from_state_dict(sd, heads=False, formulation="pairs").to(CUDA)
    half = SpUNetEngine.from_state_dict(sd, heads=False, formulation="pairs", precision="bf16").to(CUDA)
    a = torch.from_numpy(ref.run(voxels.feat, voxels.grid_coord)["backbone_feat"])
    b = torch.from_numpy(half.run(voxels.feat, voxels.grid_coord)["backbone_feat"])
    assert torch.nn.functional.cosine_similarity(a, b, dim=1).mean() > 0.99


def test_kernel_maps_cuda_equal_cpu():
    rng = np.random.default_rng(0)
    scenes = [np.unique(rng.integers(0, 60, (20000, 3)), axis=0) for _ in range(3)]
    grid = np.concatenate(scenes)
    batch = np.concatenate([np.full(len(s), i) for i, s in enumerate(scenes)])
    order = rng.permutation(len(grid))  # scenes interleaved, as a batch may arrive
    grid, batch = torch.from_numpy(grid[order]), torch.from_numpy(batch[order])
    cpu = build_kernel_maps(grid, batch)
    gpu = build_kernel_maps(grid.to(CUDA), batch.to(CUDA))
    assert gpu.num_sites == cpu.num_sites
    assert all(t.device.type == "cuda" for t in gpu.tables())
    for a, b in zip(gpu.tables(), cpu.tables(), strict=True):
        assert torch.equal(a.cpu(), b)
    for a, b in zip(gpu.coords, cpu.coords, strict=True):
        assert torch.equal(a.cpu(), b)
    # the sorted-key lookup (used when a level's dense grid is over budget) gives the same tables
    for a, b in zip(build_kernel_maps(grid.to(CUDA), batch.to(CUDA), grid_budget=0).tables(), cpu.tables(), strict=True):
        assert torch.equal(a.cpu(), b)


@pytest.mark.parametrize("name,condition,expected_file", CASES)
def test_spconv_fixture_parity_on_cuda(name, condition, expected_file):
    if os.environ.get("PONDER_GPU_SPCONV") == "0":
        pytest.skip(os.environ.get("PONDER_GPU_SPCONV_REASON", "spconv marked unusable on this host"))
    pytest.importorskip("spconv.pytorch")
    from model.build import build_model
    from model.checkpoint import LoadedModel, load_state_strict
    from model.infer_config import infer_config
    from model.inference import Predictor

    voxels, expected, sd = _fixture(name, expected_file)
    config = infer_config(sd)
    model = build_model(config)
    load_state_strict(model, sd, name)
    predictor = Predictor(LoadedModel(config=config, model=model.eval(), source=name), CUDA)  # spconv encoder
    assert predictor.backend == "spconv"
    (feat,) = predictor.encode([voxels], condition)
    (logits,) = predictor.classify([feat], condition)
    p = voxels.point_to_voxel
    assert np.abs(feat[p] - expected["backbone_feat"]).max() < 1e-4
    assert np.abs(logits[p] - expected["seg_logits"]).max() < 1e-4

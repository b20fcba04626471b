"""Numerical parity with the official implementation, through the ``ponder`` CLI as a user runs it."""

from __future__ import annotations

import dataclasses
import subprocess

import numpy as np
import pytest

from conftest import PONDER, fixture_dir

CASES = [
    ("spunet_v1m1_seg", None, "expected.npz"),
    ("ppt_v1m3_seg", "ScanNet", "expected_scannet.npz"),
    ("ppt_v1m3_seg", "S3DIS", "expected_s3dis.npz"),
]


def _ponder(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([PONDER, *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result


@pytest.mark.parametrize("name,condition,expected_file", CASES)
def test_features_and_logits_match_official(tmp_path, name, condition, expected_file):
    folder = fixture_dir(name)
    expected = np.load(folder / expected_file)
    cond = ["--condition", condition] if condition else []
    ckpt = str(folder / "checkpoint.pth")

    _ponder("features", str(folder / "input.npz"), "-o", str(tmp_path / "f.npy"), "--checkpoint", ckpt, *cond)
    features = np.load(tmp_path / "f.npy")
    assert features.dtype == np.float32 and features.shape == expected["backbone_feat"].shape
    assert np.abs(features - expected["backbone_feat"]).max() < 1e-4

    _ponder("segment", str(folder / "input.npz"), "-o", str(tmp_path / "s.npz"), "--checkpoint", ckpt, *cond)
    seg = np.load(tmp_path / "s.npz", allow_pickle=False)
    assert seg["logits"].shape == expected["seg_logits"].shape
    assert np.abs(seg["logits"] - expected["seg_logits"]).max() < 1e-4
    assert seg["labels"].dtype == np.int32
    np.testing.assert_array_equal(seg["labels"], expected["seg_logits"].argmax(1))
    assert len(seg["class_names"]) == expected["seg_logits"].shape[1]


def test_converted_checkpoint_gives_the_same_features(tmp_path):
    folder = fixture_dir("ppt_v1m3_seg")
    expected = np.load(folder / "expected_s3dis.npz")
    _ponder("convert", str(folder / "checkpoint.pth"), "-o", str(tmp_path / "ours"))
    assert (tmp_path / "ours" / "model.safetensors").exists() and (tmp_path / "ours" / "config.json").exists()
    _ponder("features", str(folder / "input.npz"), "-o", str(tmp_path / "f.npy"), "--checkpoint",
            str(tmp_path / "ours"), "--condition", "S3DIS")
    assert np.abs(np.load(tmp_path / "f.npy") - expected["backbone_feat"]).max() < 1e-4


def test_per_voxel_output_maps_back_to_points(tmp_path):
    folder = fixture_dir("spunet_v1m1_seg")
    expected = np.load(folder / "expected.npz")
    _ponder("features", str(folder / "input.npz"), "-o", str(tmp_path / "v.npy"), "--per-voxel",
            "--checkpoint", str(folder / "checkpoint.pth"))
    voxels, index = np.load(tmp_path / "v.npy"), np.load(tmp_path / "v.point_to_voxel.npy")
    assert np.abs(voxels[index] - expected["backbone_feat"]).max() < 1e-4


def test_pretraining_checkpoint_features_and_render_volume(tmp_path):
    """PonderIndoor-v2: backbone features through the CLI, then the dense volume from the loaded model."""
    import json

    import torch

    from model.checkpoint import load_checkpoint, read_official
    from model.infer_config import infer_config
    from model.pointcloud.voxelize import center_shift
    from model.render import RenderHeadConfig

    folder = fixture_dir("ponder_render")
    expected = np.load(folder / "expected.npz")
    _ponder("features", str(folder / "input.npz"), "-o", str(tmp_path / "f.npy"), "--checkpoint",
            str(folder / "checkpoint.pth"), "--condition", "ScanNet")
    features = np.load(tmp_path / "f.npy")
    assert np.abs(features - expected["backbone_feat"]).max() < 1e-4

    # grid_shape and the other non-weight settings come from the official model config, not the weights
    official = json.loads((folder / "model_config.json").read_text())
    config = infer_config(read_official(folder / "checkpoint.pth"))
    config = dataclasses.replace(config, render=dataclasses.replace(config.render,
                                                                    head=RenderHeadConfig.from_official(official)))
    model = load_checkpoint(folder / "checkpoint.pth", config=config).model
    order = expected["fnv_order"]  # network row i = input point order[i]
    coord, _ = center_shift(np.load(folder / "input.npz")["coord"], apply_z=True)
    coord, _ = center_shift(coord[order], apply_z=False)
    with torch.no_grad():
        volume = model.volume(torch.from_numpy(features[order]), torch.from_numpy(coord), torch.tensor([len(coord)]))
    assert np.abs(volume.numpy() - expected["volume"]).max() < 1e-4

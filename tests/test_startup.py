"""Inference with the default backend never imports spconv (seconds of start-up per CLI call), and gives what
the spconv backend gives; the engine-backed model keeps the spconv model's state_dict layout and strictness."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import random_room
from model.build import build_model
from model.checkpoint import CheckpointError, LoadedModel, load_checkpoint, save_checkpoint
from model.config import BackboneConfig, ModelConfig

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_thread")

# Runs in a fresh interpreter: the CLI's features/segment/detect paths, the service's predictor loading and its
# render volume, all with the default backend; then reports whether spconv was imported.
DEFAULT_PATHS = textwrap.dedent("""
    import json, sys
    import numpy as np
    from ponder.cli import main
    out, cloud_path = sys.argv[1], sys.argv[2]
    codes = [main(["features", cloud_path, "-o", out + "/features.npy"]),
             main(["segment", cloud_path, "-o", out + "/segment.npz"]),
             main(["detect", cloud_path, "-o", out + "/boxes.json", "--score", "0"])]
    from model.inference import default_checkpoint
    from model.novel_view import scene_volume
    from model.pointcloud.readers import read_point_cloud
    from service.workers.loading import load_predictors
    predictors = load_predictors({"seg": None, "render": default_checkpoint("render")})
    cloud = read_point_cloud(cloud_path)
    render = predictors["render"]
    volume = scene_volume(render.model, render.config, cloud)
    np.save(out + "/volume.npy", volume.volume.numpy())
    print(json.dumps({"codes": codes, "backends": [p.backend for p in predictors.values()],
                      "spconv": sorted(m for m in sys.modules if m.split(".")[0] == "spconv")}))
""")


@pytest.fixture(scope="module")
def cloud_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("startup") / "room.npz"
    np.savez(path, **random_room(3000, seed=3))
    return path


@pytest.fixture(scope="module")
def default_run(cloud_file) -> tuple[Path, dict]:
    out = cloud_file.parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", DEFAULT_PATHS, str(out), str(cloud_file)], capture_output=True,
                          text=True, timeout=300, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, json.loads(done.stdout.strip().splitlines()[-1])


def test_default_backend_never_imports_spconv(default_run):
    _, report = default_run
    assert report["codes"] == [0, 0, 0]
    assert report["backends"] == ["torch", "torch"]
    assert report["spconv"] == []


def test_default_backend_equals_spconv(default_run, cloud_file):
    from export.backends import load
    from model.detection import detect
    from model.inference import default_checkpoint
    from model.novel_view import scene_volume
    from model.pointcloud.readers import read_point_cloud

    out, _ = default_run
    cloud = read_point_cloud(cloud_file)
    spconv = load(None, backend="spconv")
    assert spconv.backend == "spconv"
    np.testing.assert_allclose(np.load(out / "features.npy"), spconv.features(cloud).point_features(), atol=1e-4)
    segment = spconv.segment(cloud)
    with np.load(out / "segment.npz") as got:
        np.testing.assert_allclose(got["logits"], segment.logits, atol=1e-4)
    boxes = detect(load(default_checkpoint("detect"), backend="spconv"), cloud, score_threshold=0.0).to_json()
    got = json.loads((out / "boxes.json").read_text())["detections"]
    assert len(got) == len(boxes["detections"])
    for a, b in zip(got, boxes["detections"]):
        assert a["label"] == b["label"]
        np.testing.assert_allclose(a["center"] + a["size"] + [a["yaw"]], b["center"] + b["size"] + [b["yaw"]],
                                   atol=1e-4)
    render = load(default_checkpoint("render"), backend="spconv")
    volume = scene_volume(render.model, render.config, cloud).volume
    np.testing.assert_allclose(np.load(out / "volume.npy"), volume.numpy(), atol=1e-4)


def _v1m3_config() -> ModelConfig:
    backbone = BackboneConfig(type="SpUNet-v1m3", in_channels=6, num_classes=4, base_channels=8,
                              channels=(8, 16, 16, 16, 16, 16, 16, 16), layers=(1,) * 8, context_channels=16)
    return ModelConfig(kind="ppt-backbone-segmentor", backbone=backbone, conditions=("S3DIS", "ScanNet"),
                       class_names={"S3DIS": ("a", "b", "c", "d"), "ScanNet": ("a", "b", "c", "d")})


def test_engine_backed_model_matches_the_spconv_model():
    """Same keys, shapes and classify arithmetic; features through the engine within 1e-4 of spconv's."""
    torch.manual_seed(0)
    config = _v1m3_config()
    net = build_model(config).eval()
    for p in net.parameters():  # non-trivial norms so that a wrong bank or context would show
        p.data.normal_(0, 0.3)
    loaded = LoadedModel(config, net, "random")
    light = loaded.inference_model
    assert [(k, v.shape) for k, v in light.state_dict().items()] == [(k, v.shape) for k, v in net.state_dict().items()]
    room = random_room(2000, seed=1)
    from model.prepare import prepare
    from model.pointcloud.cloud import PointCloud

    _, vox = prepare(PointCloud(coord=room["coord"], color=room["color"], normal=room["normal"]), 0.05,
                     config.input_features)
    feat, grid = torch.from_numpy(vox.feat), torch.from_numpy(vox.grid_coord)
    batch = torch.zeros(len(feat), dtype=torch.long)
    with torch.no_grad():
        for condition in config.conditions:
            want = net.features(feat, grid, batch, condition)
            got = light.features(feat, grid, batch, condition)
            torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
            torch.testing.assert_close(light.classify(got, condition), net.classify(got, condition))


def test_lazy_spconv_model_and_strict_checks(tmp_path):
    config = _v1m3_config()
    folder = save_checkpoint(build_model(config), config, tmp_path / "ok")
    loaded = load_checkpoint(folder)
    assert vars(loaded)["_model"] is None  # the spconv model is built on first use only
    state = loaded.state_dict()
    assert all(torch.equal(state[k], v) for k, v in loaded.model.state_dict().items())

    bad = dict(state)
    bad["backbone.backbone.final.bias"] = torch.zeros(9)
    del bad["backbone.embedding_table.weight"]
    from safetensors.torch import save_file

    (tmp_path / "bad").mkdir()
    save_file(bad, str(tmp_path / "bad" / "model.safetensors"))
    config.save(tmp_path / "bad" / "config.json")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path / "bad")
    assert "missing keys: backbone.embedding_table.weight" in str(err.value)
    assert "backbone.backbone.final.bias: checkpoint (9,) vs model (4,)" in str(err.value)

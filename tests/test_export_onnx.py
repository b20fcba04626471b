"""GatherSpUNet (spconv-free) and its ONNX export: parity with the official fixtures, in PyTorch and
through onnxruntime, and ONNX vs PyTorch on a generated room."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest

from conftest import PONDER, fixture_dir, random_room
from export.graph import GatherSpUNet
from export.onnx_export import FORBIDDEN_OPS, describe, export_onnx, read_info
from export.onnxrt import OnnxRunner
from model.checkpoint import read_official
from model.infer_config import infer_config
from model.pointcloud.cloud import PointCloud
from model.pointcloud.voxelize import voxelize

TOL = 1e-4
PPT_CASES = [("ScanNet", "expected_scannet.npz"), ("S3DIS", "expected_s3dis.npz")]


def _graph(name: str) -> GatherSpUNet:
    return GatherSpUNet.from_state_dict(read_official(fixture_dir(name) / "checkpoint.pth"))


def _network_input() -> dict[str, np.ndarray]:
    """The fixture's network input (grid_coord, feat) and fnv_order; grid_coord/feat are stored in input order."""
    expected = np.load(fixture_dir("spunet_v1m1_seg") / "expected.npz")
    return {k: expected[k] for k in ("grid_coord", "feat", "fnv_order")}


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


@pytest.fixture(scope="module")
def v1m1() -> GatherSpUNet:
    return _graph("spunet_v1m1_seg")


@pytest.fixture(scope="module")
def ppt() -> GatherSpUNet:
    return _graph("ppt_v1m3_seg")


@pytest.fixture(scope="module")
def onnx_models(tmp_path_factory, v1m1, ppt) -> dict[str, str]:
    out = tmp_path_factory.mktemp("onnx")
    return {"v1m1": str(export_onnx(v1m1, out / "v1m1.onnx")), "ppt": str(export_onnx(ppt, out / "ppt.onnx"))}


def _max_abs(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max())


# ---- PyTorch gather graph vs the official outputs -----------------------------------------------

def test_v1m1_gather_graph_matches_official_in_network_order(v1m1):
    data, expected = _network_input(), np.load(fixture_dir("spunet_v1m1_seg") / "expected.npz")
    order = data["fnv_order"]  # network row i = input point order[i]
    out = v1m1.run(data["feat"][order], data["grid_coord"][order])
    assert v1m1.info.outputs == ("backbone_feat", "seg_logits") and not v1m1.info.conditions
    for key in ("backbone_feat", "seg_logits"):
        assert _max_abs(out[key], expected[key][order]) <= TOL


@pytest.mark.parametrize("condition,expected_file", PPT_CASES)
def test_ppt_gather_graph_matches_official(ppt, condition, expected_file):
    data, expected = _network_input(), np.load(fixture_dir("ppt_v1m3_seg") / expected_file)
    out = ppt.run(data["feat"], data["grid_coord"], condition=condition)  # input order
    for key in ("backbone_feat", "seg_logits"):
        assert _max_abs(out[key], expected[key]) <= TOL


def test_backbone_mode_keys_and_features_only():
    """PPT in backbone_mode under a DefaultSegmentor keeps the backbone under ``backbone.backbone.`` and the
    embedding under ``backbone.embedding_table``; the same weights must give the same features."""
    sd = read_official(fixture_dir("ppt_v1m3_seg") / "checkpoint.pth")
    nested = {"backbone." + k: v for k, v in sd.items() if k.startswith("backbone.") or k.startswith("embedding")}
    graph = GatherSpUNet.from_state_dict(nested)
    assert graph.info.kind == "ppt-backbone-segmentor" and graph.info.outputs == ("backbone_feat",)
    data, expected = _network_input(), np.load(fixture_dir("ppt_v1m3_seg") / "expected_s3dis.npz")
    out = graph.run(data["feat"], data["grid_coord"], condition="S3DIS")
    assert _max_abs(out["backbone_feat"], expected["backbone_feat"]) <= TOL
    assert GatherSpUNet.from_state_dict(sd, heads=False).info.outputs == ("backbone_feat",)
    broken = {k: v for k, v in sd.items() if "down.2" not in k}
    with pytest.raises(ValueError, match="missing key"):
        GatherSpUNet.from_state_dict(broken, infer_config(sd))


def test_one_matmul_per_conv_gives_the_same_features(v1m1):
    data = _network_input()
    fused = GatherSpUNet.from_state_dict(read_official(fixture_dir("spunet_v1m1_seg") / "checkpoint.pth"),
                                         taps_per_matmul=27)
    a = v1m1.run(data["feat"], data["grid_coord"])["seg_logits"]
    b = fused.run(data["feat"], data["grid_coord"])["seg_logits"]
    assert _max_abs(a, b) <= 1e-5


def test_bad_condition_is_refused(ppt, v1m1):
    with pytest.raises(ValueError, match="unknown condition"):
        ppt.condition_index("Matterport")
    with pytest.raises(ValueError, match="no condition"):
        v1m1.condition_index("ScanNet")


# ---- ONNX export and onnxruntime ----------------------------------------------------------------

def test_exported_graph_is_clean_and_described(onnx_models):
    for key, path in onnx_models.items():
        model = onnx.load(path)
        onnx.checker.check_model(model, full_check=True)
        ops = {n.op_type for n in model.graph.node}
        assert not ops & set(FORBIDDEN_OPS), ops
        assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
        info = read_info(model)
        desc = describe(path)
        assert desc["inputs"]["feat"] == ["m0", 6] and desc["inputs"]["down0_map"] == ["m1", 8]
        assert desc["outputs"]["backbone_feat"] == ["m0", 24]
        if key == "ppt":
            assert info.conditions == ("Structured3D", "ScanNet", "S3DIS")
            assert info.num_classes == {"Structured3D": 25, "ScanNet": 20, "S3DIS": 13}
            assert desc["inputs"]["condition"] == [1]
            assert desc["outputs"]["seg_logits"] == ["m0", "num_classes"]  # depends on the condition
        else:
            assert info.kind == "segmentor" and desc["outputs"]["seg_logits"] == ["m0", 20]
        tables = [v for v in model.graph.input if v.name not in ("feat", "condition")]
        assert tables and all(v.type.tensor_type.elem_type == onnx.TensorProto.INT32 for v in tables)
        meta = {p.key: p.value for p in model.metadata_props}
        assert json.loads(meta["ponder.inputs"])[0] == "feat" and float(meta["ponder.grid_size"]) == 0.02


def test_onnxruntime_matches_official_v1m1(onnx_models):
    data, expected = _network_input(), np.load(fixture_dir("spunet_v1m1_seg") / "expected.npz")
    runner = OnnxRunner(onnx_models["v1m1"], device="cpu", threads=1)
    out = runner.run(data["feat"], data["grid_coord"])
    for key in ("backbone_feat", "seg_logits"):
        assert _max_abs(out[key], expected[key]) <= TOL
    with pytest.raises(ValueError, match="no condition"):
        runner.run(data["feat"], data["grid_coord"], condition="ScanNet")
    with pytest.raises(ValueError, match=r"shape \(M, 6\)"):
        runner.run(data["feat"][:, :3], data["grid_coord"])


@pytest.mark.parametrize("condition,expected_file", PPT_CASES)
def test_onnxruntime_matches_official_ppt(onnx_models, condition, expected_file):
    data, expected = _network_input(), np.load(fixture_dir("ppt_v1m3_seg") / expected_file)
    runner = OnnxRunner(onnx_models["ppt"], device="cpu", threads=1)
    out = runner.run(data["feat"], data["grid_coord"], condition=condition)
    for key in ("backbone_feat", "seg_logits"):
        assert _max_abs(out[key], expected[key]) <= TOL


def test_onnxruntime_matches_torch_on_a_batch_of_generated_rooms(onnx_models, ppt):
    """Two generated rooms in one request: ONNX == PyTorch gather graph, and scenes do not interact."""
    scenes = [voxelize(PointCloud(**random_room(8000, seed=s)).validate(), 0.02, ("color", "normal"))
              for s in (1, 2)]
    runner = OnnxRunner(onnx_models["ppt"], device="cpu", threads=1)
    together = runner.run_scenes(scenes, condition="S3DIS")
    feat = np.concatenate([s.feat for s in scenes])
    grid = np.concatenate([s.grid_coord for s in scenes])
    batch = np.repeat([0, 1], [s.num_voxels for s in scenes])
    torch_out = ppt.run(feat, grid, batch, condition="S3DIS")
    rows = np.split(np.arange(len(feat)), [scenes[0].num_voxels])
    for i, scene in enumerate(scenes):
        alone = runner.run(scene.feat, scene.grid_coord, condition="S3DIS")
        for key in ("backbone_feat", "seg_logits"):
            ref = torch_out[key][rows[i]]
            assert _max_abs(together[i][key], ref) <= TOL * max(1.0, np.abs(ref).max())
            assert _max_abs(alone[key], together[i][key]) <= 1e-5
        assert together[i]["seg_logits"].shape == (scene.num_voxels, 13)


@pytest.mark.slow
def test_dynamo_exporter_gives_the_same_model(tmp_path, v1m1):
    """The dynamo exporter works too but takes minutes on this graph (~2,600 nodes); the TorchScript
    exporter is the default."""
    path = export_onnx(v1m1, tmp_path / "dynamo.onnx", exporter="dynamo")
    data, expected = _network_input(), np.load(fixture_dir("spunet_v1m1_seg") / "expected.npz")
    out = OnnxRunner(path, device="cpu", threads=1).run(data["feat"], data["grid_coord"])
    assert _max_abs(out["seg_logits"], expected["seg_logits"]) <= TOL


def test_export_rejects_unknown_exporter(tmp_path, v1m1):
    with pytest.raises(ValueError, match="exporter"):
        export_onnx(v1m1, tmp_path / "x.onnx", exporter="tf")


def test_cli_backends_give_the_same_per_point_outputs(tmp_path):
    """`ponder features|segment --backend onnxruntime` equals the PyTorch (spconv) backend and the fixture."""
    import subprocess

    folder = fixture_dir("ppt_v1m3_seg")
    expected = np.load(folder / "expected_s3dis.npz")
    env = {**os.environ, "PONDER_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    base = ["--checkpoint", str(folder / "checkpoint.pth"), "--condition", "S3DIS", "--backend", "onnxruntime"]
    for command, out in (("features", "f.npy"), ("segment", "s.npz")):
        result = subprocess.run([PONDER, command, str(folder / "input.npz"), "-o", str(tmp_path / out), *base],
                                capture_output=True, text=True, timeout=600, env=env)
        assert result.returncode == 0, result.stderr
    assert np.abs(np.load(tmp_path / "f.npy") - expected["backbone_feat"]).max() < 1e-4
    assert np.abs(np.load(tmp_path / "s.npz")["logits"] - expected["seg_logits"]).max() < 1e-4
    assert list((tmp_path / "cache" / "onnx").glob("*.onnx"))  # exported once, cached

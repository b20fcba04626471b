"""Triton model repository: config.pbtxt checked with Triton's own protobuf schema, and the exported
model served by a real tritonserver (through nvidia-pytriton) and queried with tritonclient."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

from conftest import fixture_dir
from export.graph import GatherSpUNet
from export.onnx_export import export_onnx, read_info
from export.onnxrt import OnnxRunner
from export.tensorrt import TensorRTUnavailable, VoxelRange, build_engine, tensorrt_available
from export.triton_repo import config_metadata, model_config, read_model_config, write_triton_repository
from model.checkpoint import read_official


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


@pytest.fixture(scope="module")
def ppt_onnx(tmp_path_factory) -> Path:
    graph = GatherSpUNet.from_state_dict(read_official(fixture_dir("ppt_v1m3_seg") / "checkpoint.pth"))
    return export_onnx(graph, tmp_path_factory.mktemp("onnx") / "ppt.onnx")


@pytest.fixture(scope="module")
def scene() -> dict[str, np.ndarray]:
    expected = np.load(fixture_dir("spunet_v1m1_seg") / "expected.npz")
    return {"feat": expected["feat"], "grid_coord": expected["grid_coord"]}


def _parse(folder: Path) -> pb.ModelConfig:
    return text_format.Parse((folder / "config.pbtxt").read_text(), pb.ModelConfig())


def test_repository_layout_and_config(tmp_path, ppt_onnx):
    folder = write_triton_repository(tmp_path / "repo", ppt_onnx, "ponder_ppt", instance_count=2)
    assert folder == tmp_path / "repo" / "ponder_ppt"
    assert (folder / "1" / "model.onnx").read_bytes() == ppt_onnx.read_bytes()
    config = _parse(folder)
    assert config.name == "ponder_ppt" and config.backend == "onnxruntime"
    assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
    assert [(g.kind, g.count) for g in config.instance_group] == [(pb.ModelInstanceGroup.KIND_GPU, 2)]
    inputs = {i.name: (i.data_type, list(i.dims)) for i in config.input}
    info = read_info(ppt_onnx)
    assert list(inputs) == info.input_names
    assert inputs["feat"] == (pb.TYPE_FP32, [-1, 6]) and inputs["stem_nbr"] == (pb.TYPE_INT64, [-1, 125])
    assert inputs["up3_map"] == (pb.TYPE_INT64, [-1, 8]) and inputs["condition"] == (pb.TYPE_INT64, [1])
    outputs = {o.name: list(o.dims) for o in config.output}
    assert outputs == {"backbone_feat": [-1, 24], "seg_logits": [-1, -1]}
    meta = config_metadata(config)
    assert meta["conditions"] == ["Structured3D", "ScanNet", "S3DIS"] and meta["num_classes"]["S3DIS"] == 13
    assert read_model_config(folder) == config


def test_cpu_and_tensorrt_variants_parse(tmp_path, ppt_onnx):
    info = read_info(ppt_onnx)
    cpu = write_triton_repository(tmp_path, ppt_onnx, "ponder_cpu", device="cpu")
    assert [g.kind for g in _parse(cpu).instance_group] == [pb.ModelInstanceGroup.KIND_CPU]
    trt = model_config(info, "ponder_trt", kind="tensorrt")
    parsed = text_format.Parse(text_format.MessageToString(trt), pb.ModelConfig())
    assert parsed.backend == "tensorrt" and parsed.default_model_filename == "model.plan"
    assert [i.name for i in parsed.input] == info.input_names


def test_bad_repository_requests_are_refused(tmp_path, ppt_onnx):
    info = read_info(ppt_onnx)
    with pytest.raises(ValueError, match="max_batch_size must be 0"):
        write_triton_repository(tmp_path, ppt_onnx, "m", max_batch_size=8)
    with pytest.raises(ValueError, match="GPUs only"):
        model_config(info, "m", kind="tensorrt", device="cpu")
    with pytest.raises(ValueError, match="kind must be"):
        model_config(info, "m", kind="pytorch")
    with pytest.raises(ValueError, match="invalid Triton model name"):
        write_triton_repository(tmp_path, ppt_onnx, "a/b")
    with pytest.raises(FileNotFoundError):
        write_triton_repository(tmp_path, tmp_path / "missing.onnx", "m")


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def test_served_by_real_triton_matches_onnxruntime(tmp_path, ppt_onnx, scene):
    """tritonserver 2.51 (nvidia-pytriton) has only the Python backend, so the repository's model.onnx is
    bound through pytriton with an onnxruntime session; requests still go through the real server."""
    pytest.importorskip("pytriton")
    from pytriton.triton import Triton, TritonConfig

    from export.triton_serve import TritonRunner, bind_onnx_model, fix_libpython_path

    folder = write_triton_repository(tmp_path / "repo", ppt_onnx, "ponder_ppt", device="cpu")
    direct = OnnxRunner(ppt_onnx, device="cpu", threads=1)
    fix_libpython_path()
    http, grpc, metrics = _free_ports(3)
    config = TritonConfig(http_address="127.0.0.1", http_port=http, grpc_address="127.0.0.1", grpc_port=grpc,
                          metrics_port=metrics, exit_timeout_secs=5)
    with Triton(config=config, workspace=tmp_path / "triton") as triton:
        bind_onnx_model(triton, folder, threads=1)
        triton.run()
        for protocol, url in (("http", f"127.0.0.1:{http}"), ("grpc", f"127.0.0.1:{grpc}")):
            with TritonRunner(url, "ponder_ppt", ppt_onnx, protocol=protocol) as client:
                for condition, classes in (("ScanNet", 20), ("S3DIS", 13)):
                    served = client.run(scene["feat"], scene["grid_coord"], condition=condition)
                    ref = direct.run(scene["feat"], scene["grid_coord"], condition=condition)
                    assert served["seg_logits"].shape == (len(scene["feat"]), classes)
                    for key in ("backbone_feat", "seg_logits"):
                        assert np.abs(served[key] - ref[key]).max() <= 1e-5


def test_tensorrt_profiles_and_engine(tmp_path, ppt_onnx):
    assert VoxelRange(10, 90, 100).level(0) == (10, 90, 100) and VoxelRange(10, 90, 100).level(2) == (1, 10, 100)
    with pytest.raises(ValueError):
        VoxelRange(5, 1, 10)
    if not tensorrt_available():
        with pytest.raises(TensorRTUnavailable):
            build_engine(ppt_onnx, tmp_path / "model.plan")
        pytest.skip("TensorRT is not installed here (GPU-only optional extra); engine build not exercised")
    plan = build_engine(ppt_onnx, tmp_path / "model.plan", profiles=(VoxelRange(1, 30_000, 60_000),))
    folder = write_triton_repository(tmp_path / "repo", ppt_onnx, "ponder_trt", kind="tensorrt", plan_path=plan)
    assert (folder / "1" / "model.plan").stat().st_size > 0 and _parse(folder).backend == "tensorrt"

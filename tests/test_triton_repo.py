"""Triton model repository: the ensemble (kernel maps -> encoder; python-torch: one encoder step that builds its
own tables) of every kind, its config.pbtxt files parsed with Triton's own protobuf schema and checked. Serving it in a real tritonserver behind the gateway is
tests/test_service_triton.py (python-onnxruntime kind; the onnxruntime/tensorrt backends are not in the
tritonserver of nvidia-pytriton)."""

from __future__ import annotations

import py_compile
import subprocess
from pathlib import Path

import onnx
import pytest
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2 as pb

from conftest import PONDER, fixture_dir
from export.onnx_export import read_info
from export.tensorrt import TensorRTUnavailable, VoxelRange, build_engine, tensorrt_available
from export.triton_repo import (KINDS, PYTHON_KINDS, config_metadata, parse_config_json, read_model_config,
                                step_names, write_triton_repository)

pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py
GATEWAY = ["grid_coord", "batch", "feat"]


@pytest.fixture(scope="module")
def ppt_onnx(tmp_path_factory) -> Path:
    from ponder.cli import main as ponder

    path = tmp_path_factory.mktemp("onnx") / "ppt.onnx"
    assert ponder(["export", "onnx", str(fixture_dir("ppt_v1m3_seg") / "checkpoint.pth"), "-o", str(path)]) == 0
    return path


@pytest.fixture(scope="module")
def ppt_weights():
    from model.checkpoint import load_checkpoint

    return load_checkpoint(fixture_dir("ppt_v1m3_seg") / "checkpoint.pth")


def _parse(folder: Path) -> pb.ModelConfig:
    return text_format.Parse((folder / "config.pbtxt").read_text(), pb.ModelConfig())


def _table_types(onnx_path: Path) -> dict[str, int]:
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    types = {v.name: v.type.tensor_type.elem_type for v in graph.input}
    to_triton = {onnx.TensorProto.INT32: pb.TYPE_INT32, onnx.TensorProto.INT64: pb.TYPE_INT64}
    return {n: to_triton[t] for n, t in types.items() if n not in ("feat", "condition")}


def test_ensemble_layout_and_configs(tmp_path, ppt_onnx):
    repo = tmp_path / "repo"
    folder = write_triton_repository(repo, ppt_onnx, "ponder_ppt", kind="python-onnxruntime", threads=2)
    maps_name, encoder_name = step_names("ponder_ppt")
    assert folder == repo / "ponder_ppt" and (folder / "1").is_dir()
    assert sorted(p.name for p in repo.iterdir()) == sorted(["ponder_ppt", maps_name, encoder_name])
    assert (repo / encoder_name / "1" / "model.onnx").read_bytes() == ppt_onnx.read_bytes()
    for script in (repo / maps_name / "1" / "ponder_kernel_maps.py",
                   repo / encoder_name / "1" / "ponder_onnx_encoder.py"):
        py_compile.compile(str(script), cfile=str(tmp_path / "x.pyc"), doraise=True)

    ensemble, maps, encoder = _parse(folder), _parse(repo / maps_name), _parse(repo / encoder_name)
    info = read_info(ppt_onnx)
    assert ensemble.platform == "ensemble" and ensemble.max_batch_size == 0
    assert {i.name: (i.data_type, list(i.dims)) for i in ensemble.input} == {
        "grid_coord": (pb.TYPE_INT32, [-1, 3]), "batch": (pb.TYPE_INT32, [-1]), "feat": (pb.TYPE_FP32, [-1, 6]),
        "condition": (pb.TYPE_INT64, [1])}
    assert {o.name: list(o.dims) for o in ensemble.output} == {"backbone_feat": [-1, 24], "seg_logits": [-1, -1]}
    meta = config_metadata(ensemble)
    assert meta["conditions"] == ["Structured3D", "ScanNet", "S3DIS"] and meta["num_classes"]["S3DIS"] == 13
    assert meta["kind"] == info.kind and meta["out_channels"] == 24 and meta["grid_size"] == 0.02

    # step 1: the gateway's tensors in, every table out, typed as the ONNX graph takes them
    assert maps.backend == "python" and [i.name for i in maps.input] == GATEWAY + ["condition"]
    assert {o.name: o.data_type for o in maps.output} == _table_types(ppt_onnx)
    assert config_metadata(maps)["num_levels"] == info.num_levels and config_metadata(maps)["stem_kernel"] == 5
    # step 2: exactly the ONNX graph's inputs and outputs
    assert encoder.backend == "python" and config_metadata(encoder)["threads"] == 2
    assert [i.name for i in encoder.input] == info.input_names
    assert [o.name for o in encoder.output] == list(info.outputs)
    assert [g.kind for g in encoder.instance_group] == [pb.ModelInstanceGroup.KIND_CPU]

    # the ensemble wires them: tables from step 1, everything else from the request
    step1, step2 = ensemble.ensemble_scheduling.step
    assert (step1.model_name, step2.model_name) == (maps_name, encoder_name)
    assert dict(step1.input_map) == {n: n for n in GATEWAY + ["condition"]}
    assert set(step1.output_map.values()) == set(_table_types(ppt_onnx))
    assert set(step2.input_map) == set(info.input_names) and set(step2.output_map.values()) == set(info.outputs)
    produced = set(step1.output_map.values()) | {i.name for i in ensemble.input}
    assert set(step2.input_map.values()) <= produced
    # what a gateway reads back over gRPC/HTTP as JSON parses to the same config
    assert parse_config_json({"config": json_format.MessageToDict(ensemble)}) == ensemble
    assert read_model_config(folder) == ensemble


def test_all_kinds_share_names_and_differ_only_in_the_encoder(tmp_path, ppt_onnx, ppt_weights):
    plan = tmp_path / "prebuilt.plan"
    plan.write_bytes(b"engine bytes")  # copied as is; its contents are TensorRT's business
    configs = {}
    for kind in KINDS:
        repo = tmp_path / kind
        write_triton_repository(repo, ppt_onnx, "m", kind=kind, plan_path=plan if kind == "tensorrt" else None,
                                weights=ppt_weights if kind == "python-torch" else None)
        configs[kind] = {p.name: _parse(p) for p in repo.iterdir()}
    reference = configs["onnxruntime"]
    for kind, models in configs.items():
        device = pb.ModelInstanceGroup.KIND_CPU if kind in PYTHON_KINDS else pb.ModelInstanceGroup.KIND_GPU
        for step in set(models) - {"m"}:
            assert [g.kind for g in models[step].instance_group] == [device]
        # what clients see is the same for every kind: the ensemble's tensors and metadata
        for field in ("input", "output", "parameters"):
            assert getattr(models["m"], field) == getattr(reference["m"], field), (kind, field)
        if kind == "python-torch":  # one step that takes the gateway's tensors and builds the tables itself
            assert sorted(models) == ["m", "m_encoder"]
            assert [s.model_name for s in models["m"].ensemble_scheduling.step] == ["m_encoder"]
            assert [(i.name, i.data_type, list(i.dims)) for i in models["m_encoder"].input] == \
                [(i.name, i.data_type, list(i.dims)) for i in reference["m"].input]
            continue
        assert sorted(models) == ["m", "m_encoder", "m_kernel_maps"]
        assert models["m"] == reference["m"]  # same ensemble, same tensor names
        encoder = models["m_encoder"]
        assert [(i.name, i.data_type, list(i.dims)) for i in encoder.input] == \
            [(i.name, i.data_type, list(i.dims)) for i in reference["m_encoder"].input]
    assert configs["onnxruntime"]["m_encoder"].backend == "onnxruntime"
    assert configs["onnxruntime"]["m_encoder"].default_model_filename == "model.onnx"
    assert configs["tensorrt"]["m_encoder"].backend == "tensorrt"
    assert configs["tensorrt"]["m_encoder"].default_model_filename == "model.plan"
    assert (tmp_path / "tensorrt" / "m_encoder" / "1" / "model.plan").read_bytes() == b"engine bytes"
    assert (tmp_path / "onnxruntime" / "m_encoder" / "1" / "model.onnx").exists()
    cpu = write_triton_repository(tmp_path / "cpu", ppt_onnx, "c", kind="onnxruntime", device="cpu", instance_count=3)
    groups = _parse(cpu.parent / "c_encoder").instance_group
    assert [(g.kind, g.count) for g in groups] == [(pb.ModelInstanceGroup.KIND_CPU, 3)]


def test_python_torch_holds_the_checkpoint_the_onnx_file_came_from(tmp_path, ppt_onnx, ppt_weights):
    from export.onnx_export import weights_digest
    from model.checkpoint import load_checkpoint

    repo = tmp_path / "repo"
    write_triton_repository(repo, ppt_onnx, "m", kind="python-torch", threads=2, weights=ppt_weights)
    version = repo / "m_encoder" / "1"
    assert sorted(p.name for p in version.iterdir()) == ["checkpoint", "ponder_torch_encoder.py"]
    py_compile.compile(str(version / "ponder_torch_encoder.py"), cfile=str(tmp_path / "x.pyc"), doraise=True)
    stored = load_checkpoint(version / "checkpoint")
    assert weights_digest(stored.state_dict()) == weights_digest(ppt_weights.state_dict())
    assert stored.config.kind == ppt_weights.config.kind
    encoder = _parse(repo / "m_encoder")
    assert encoder.backend == "python" and encoder.default_model_filename == "ponder_torch_encoder.py"
    meta = config_metadata(encoder)
    assert (meta["threads"], meta["in_channels"], meta["num_conditions"]) == (2, 6, 3)  # what its checks need
    assert [i.name for i in encoder.input] == GATEWAY + ["condition"]
    assert sorted(p.name for p in repo.iterdir()) == ["m", "m_encoder"]  # no kernel-map step: no tables in shm


def test_a_python_torch_export_drops_the_kernel_map_step_of_the_earlier_export(tmp_path, ppt_onnx, ppt_weights):
    """Re-exporting ``ponder`` as python-torch removes its old kernel-map step (Triton would still load it); the
    other way round brings it back; a folder named like the step that is not one is never removed."""
    repo = tmp_path / "repo"
    write_triton_repository(repo, ppt_onnx, "ponder", kind="python-onnxruntime")
    write_triton_repository(repo, ppt_onnx, "ponder", kind="python-torch", weights=ppt_weights)
    assert sorted(p.name for p in repo.iterdir()) == ["ponder", "ponder_encoder"]
    write_triton_repository(repo, ppt_onnx, "ponder", kind="python-onnxruntime")
    assert sorted(p.name for p in repo.iterdir()) == ["ponder", "ponder_encoder", "ponder_kernel_maps"]
    assert _parse(repo / "ponder").ensemble_scheduling.step[0].model_name == "ponder_kernel_maps"

    write_triton_repository(repo, ppt_onnx, "other", kind="python-torch", weights=ppt_weights)
    (repo / "other_kernel_maps" / "1").mkdir(parents=True)  # not a step of the ensemble "other": left alone
    write_triton_repository(repo, ppt_onnx, "other", kind="python-torch", weights=ppt_weights)
    assert (repo / "other_kernel_maps" / "1").is_dir()


def test_python_torch_refuses_an_onnx_file_alone_or_other_weights(tmp_path, ppt_onnx):
    from model.checkpoint import load_checkpoint

    with pytest.raises(ValueError, match="pass the checkpoint, not an exported .onnx file"):
        write_triton_repository(tmp_path / "repo", ppt_onnx, "m", kind="python-torch")
    other = load_checkpoint(fixture_dir("spunet_v1m1_seg") / "checkpoint.pth")
    with pytest.raises(ValueError, match="exported from other weights than the checkpoint given"):
        write_triton_repository(tmp_path / "repo", ppt_onnx, "m", kind="python-torch", weights=other)
    assert not (tmp_path / "repo").exists()
    result = subprocess.run([PONDER, "export", "triton-repo", str(ppt_onnx), "-o", str(tmp_path / "repo"), "--kind",
                             "python-torch"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "pass the checkpoint, not an exported .onnx file" in result.stderr, result.stderr
    assert not (tmp_path / "repo").exists()


def test_table_types_follow_the_onnx_graph(tmp_path, ppt_onnx):
    """A graph that takes int64 tables gets int64 tables from step 1 (the dtype is read, not assumed)."""
    model = onnx.load(str(ppt_onnx))
    for value in model.graph.input:
        if value.name.endswith(("_nbr", "_map")):
            value.type.tensor_type.elem_type = onnx.TensorProto.INT64
    other = tmp_path / "int64.onnx"
    onnx.save(model, str(other))
    repo = tmp_path / "repo"
    write_triton_repository(repo, other, "m", kind="onnxruntime")
    assert {o.data_type for o in _parse(repo / "m_kernel_maps").output} == {pb.TYPE_INT64}
    assert {i.data_type for i in _parse(repo / "m_encoder").input if i.name.endswith("_map")} == {pb.TYPE_INT64}


def test_bad_repository_requests_are_refused(tmp_path, ppt_onnx):
    with pytest.raises(ValueError, match="max_batch_size must be 0"):
        write_triton_repository(tmp_path, ppt_onnx, "m", max_batch_size=8)
    with pytest.raises(ValueError, match="GPUs only"):
        write_triton_repository(tmp_path, ppt_onnx, "m", kind="tensorrt", device="cpu")
    with pytest.raises(ValueError, match="kind must be"):
        write_triton_repository(tmp_path, ppt_onnx, "m", kind="pytorch")
    with pytest.raises(ValueError, match="invalid Triton model name"):
        write_triton_repository(tmp_path, ppt_onnx, "a/b")
    with pytest.raises(FileNotFoundError):
        write_triton_repository(tmp_path, tmp_path / "missing.onnx", "m")
    assert not any(tmp_path.iterdir())  # nothing half-written


@pytest.mark.parametrize("name", ["my model", "x\ny", "-dash-first", "a" * 101, "caf\u00e9"])
def test_names_triton_cannot_serve_are_refused(tmp_path, ppt_onnx, name):
    """A space made both Python stubs die at start (stol) and the worker wait for ever: refused at export."""
    with pytest.raises(ValueError, match="invalid Triton model name"):
        write_triton_repository(tmp_path / "repo", ppt_onnx, name, kind="python-onnxruntime")
    assert not (tmp_path / "repo").exists()


def test_an_export_never_replaces_another_ensembles_steps_or_unrelated_models(tmp_path, ppt_onnx):
    repo = tmp_path / "repo"
    write_triton_repository(repo, ppt_onnx, "ponder", kind="python-onnxruntime")
    encoder = (repo / "ponder_encoder" / "config.pbtxt").read_text()
    with pytest.raises(ValueError, match="is a step of the ensemble 'ponder'"):
        write_triton_repository(repo, ppt_onnx, "ponder_encoder", kind="python-onnxruntime")
    assert (repo / "ponder_encoder" / "config.pbtxt").read_text() == encoder  # untouched
    assert sorted(p.name for p in repo.iterdir()) == ["ponder", "ponder_encoder", "ponder_kernel_maps"]
    (repo / "hand_made_encoder" / "1").mkdir(parents=True)
    with pytest.raises(ValueError, match="not part of an export of 'hand_made'"):
        write_triton_repository(repo, ppt_onnx, "hand_made", kind="python-onnxruntime")
    assert not any((repo / "hand_made_encoder" / "1").iterdir())
    write_triton_repository(repo, ppt_onnx, "ponder", kind="python-onnxruntime")  # its own export: replaced
    write_triton_repository(repo, ppt_onnx, "second", kind="python-onnxruntime")  # beside it: fine
    assert _parse(repo / "ponder").ensemble_scheduling.step[1].model_name == "ponder_encoder"


def test_cli_refuses_bad_names_and_clashes_in_one_line_and_lists_what_it_replaced(tmp_path, ppt_onnx):
    from ponder.cli import main as ponder

    repo = tmp_path / "repo"
    assert ponder(["export", "triton-repo", str(ppt_onnx), "-o", str(repo), "--kind", "python-onnxruntime"]) == 0
    for name, message in (("a b", "invalid Triton model name"), ("ponder_encoder", "is a step of the ensemble")):
        result = subprocess.run([PONDER, "export", "triton-repo", str(fixture_dir("ppt_v1m3_seg") / "checkpoint.pth"),
                                 "-o", str(repo), "--kind", "python-onnxruntime", "--name", name],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and message in result.stderr, result.stderr
    again = subprocess.run([PONDER, "export", "triton-repo", str(ppt_onnx), "-o", str(repo), "--kind",
                            "python-onnxruntime"], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and '"replaced": ["ponder", "ponder_kernel_maps", "ponder_encoder"]' in again.stderr
    torch_kind = subprocess.run([PONDER, "export", "triton-repo", str(fixture_dir("ppt_v1m3_seg") / "checkpoint.pth"),
                                 "-o", str(repo), "--kind", "python-torch"], capture_output=True, text=True, timeout=120)
    assert torch_kind.returncode == 0, torch_kind.stderr
    assert '"replaced": ["ponder", "ponder_encoder"], "removed": ["ponder_kernel_maps"]' in torch_kind.stderr


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
    assert (folder.parent / "ponder_trt_encoder" / "1" / "model.plan").stat().st_size > 0

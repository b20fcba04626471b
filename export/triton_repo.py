"""Triton model repository for an exported GatherSpUNet: ``<out>/<name>/config.pbtxt`` + ``1/model.onnx``
(onnxruntime backend) or ``1/model.plan`` (TensorRT).

The config is built as Triton's own ``ModelConfig`` protobuf (shipped by tritonclient) and written in
its text format, so every field name and enum is checked by protobuf, not by string formatting.

Why ``max_batch_size: 0`` and no dynamic batching: a request is one or more whole scenes with their
own voxel counts at every UNet level, and its neighbour tables hold row numbers *of that request*.
Triton's batcher stacks requests along a new leading axis and only combines equal shapes, so it
cannot merge two scenes; merging them correctly means concatenating the rows and re-basing every
table index, i.e. recomputing kernel maps. That is the gateway's job (several scenes in one request,
with distinct batch ids, before `model.sparse.kernel_maps` runs). So the model takes full shapes
with -1 for every voxel-count axis, and concurrency comes from ``instance_group.count``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

from export.graph import GraphInfo
from export.onnx_export import metadata, read_info

KINDS = {"onnxruntime": ("onnxruntime", "model.onnx"), "tensorrt": ("tensorrt", "model.plan")}
DEVICES = {"gpu": pb.ModelInstanceGroup.KIND_GPU, "cpu": pb.ModelInstanceGroup.KIND_CPU}


def io_shapes(info: GraphInfo) -> tuple[list[tuple[str, int, list[int]]], list[tuple[str, int, list[int]]]]:
    """(name, Triton data type, dims) of every input and output; -1 = dynamic."""
    inputs = [("feat", pb.TYPE_FP32, [-1, info.in_channels]), ("stem_nbr", pb.TYPE_INT64, [-1, info.stem_kernel**3])]
    inputs += [(f"subm{l}_nbr", pb.TYPE_INT64, [-1, 27]) for l in range(info.num_levels)]
    inputs += [(f"down{l}_map", pb.TYPE_INT64, [-1, 8]) for l in range(info.num_levels - 1)]
    inputs += [(f"up{l}_map", pb.TYPE_INT64, [-1, 8]) for l in range(info.num_levels - 1)]
    if info.conditions:
        inputs.append(("condition", pb.TYPE_INT64, [1]))
    outputs = [("backbone_feat", pb.TYPE_FP32, [-1, info.out_channels])]
    if "seg_logits" in info.outputs:
        classes = set(info.num_classes.values())
        outputs.append(("seg_logits", pb.TYPE_FP32, [-1, classes.pop() if len(classes) == 1 else -1]))
    return inputs, outputs


def model_config(info: GraphInfo, name: str, kind: str = "onnxruntime", device: str = "gpu",
                 instance_count: int = 1, max_batch_size: int = 0) -> pb.ModelConfig:
    """Triton ``ModelConfig`` for an exported graph (see the module docstring for the batching choice)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
    if device not in DEVICES:
        raise ValueError(f"device must be one of {sorted(DEVICES)}, got {device!r}")
    if kind == "tensorrt" and device == "cpu":
        raise ValueError("a TensorRT plan runs on GPUs only; use kind='onnxruntime' for CPU instances")
    if max_batch_size != 0:
        raise ValueError("max_batch_size must be 0: requests are ragged scenes whose tables index their own rows, "
                         "so Triton cannot batch them (batch scenes in one request instead)")
    if instance_count < 1:
        raise ValueError(f"instance_count must be >= 1, got {instance_count}")
    backend, filename = KINDS[kind]
    config = pb.ModelConfig(name=name, backend=backend, max_batch_size=0, default_model_filename=filename)
    inputs, outputs = io_shapes(info)
    for n, dtype, dims in inputs:
        config.input.add(name=n, data_type=dtype, dims=dims)
    for n, dtype, dims in outputs:
        config.output.add(name=n, data_type=dtype, dims=dims)
    config.instance_group.add(kind=DEVICES[device], count=instance_count)
    config.version_policy.latest.num_versions = 1
    for key, value in metadata(info).items():  # what a client needs to build the inputs and read outputs
        config.parameters[key].string_value = value
    return config


def write_triton_repository(out_dir: str | Path, onnx_path: str | Path, name: str, max_batch_size: int = 0,
                            instance_count: int = 1, kind: str = "onnxruntime", device: str = "gpu",
                            plan_path: str | Path | None = None) -> Path:
    """Write ``<out_dir>/<name>/config.pbtxt`` and ``<out_dir>/<name>/1/model.onnx`` (or ``model.plan``).

    onnx_path: the exported ONNX model; its metadata gives the inputs and outputs. For
    kind="tensorrt", ``plan_path`` is the engine built from it (`export.tensorrt.build_engine`); without
    one the engine is built here, which needs TensorRT and a GPU. Returns the model folder."""
    onnx_path = Path(onnx_path)
    if not onnx_path.exists():
        raise FileNotFoundError(f"{onnx_path}: no such ONNX model")
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"invalid Triton model name {name!r}")
    info = read_info(onnx_path)
    config = model_config(info, name, kind, device, instance_count, max_batch_size)
    folder = Path(out_dir) / name
    version = folder / "1"
    version.mkdir(parents=True, exist_ok=True)
    target = version / KINDS[kind][1]
    if kind == "onnxruntime":
        shutil.copyfile(onnx_path, target)
    elif plan_path is not None:
        shutil.copyfile(plan_path, target)
    else:
        from export.tensorrt import build_engine

        build_engine(onnx_path, target)
    (folder / "config.pbtxt").write_text(text_format.MessageToString(config))
    return folder


def read_model_config(path: str | Path) -> pb.ModelConfig:
    """Parse a ``config.pbtxt`` (file or model folder) with Triton's protobuf schema."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.pbtxt"
    return text_format.Parse(path.read_text(), pb.ModelConfig())


def config_metadata(config: pb.ModelConfig) -> dict:
    """The ponder metadata stored in a config's ``parameters`` (JSON values decoded)."""
    out = {}
    for key, value in config.parameters.items():
        if key.startswith("ponder."):
            text = value.string_value
            try:
                out[key[len("ponder."):]] = json.loads(text)
            except json.JSONDecodeError:
                out[key[len("ponder."):]] = text
    return out

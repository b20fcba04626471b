"""Triton model repository for an exported encoder: one ensemble that takes what the gateway has.

Layout (``NAME`` = ``--name``)::

    NAME/                 ensemble (the model clients call); its parameters carry the ponder metadata
    NAME_kernel_maps/     Python backend, 1/ponder_kernel_maps.py: grid_coord + batch -> kernel-map tables
                          (not for python-torch, whose encoder builds its own)
    NAME_encoder/         the exported graph: 1/model.onnx (onnxruntime), 1/model.plan (tensorrt), or
                          1/ponder_onnx_encoder.py + 1/model.onnx (python-onnxruntime: the same ONNX file in
                          onnxruntime inside a Python-backend model, for Triton builds without that backend), or
                          1/ponder_torch_encoder.py + 1/checkpoint/ (python-torch: the checkpoint in ponder's
                          torch engine, which builds the tables itself from the gateway's tensors and runs valid
                          pairs on CPU instances: the fast CPU worker)

The Python models are not called ``model.py`` (Triton's default): the stub puts their folder on ``sys.path``,
where a ``model.py`` would shadow the ``model`` package the kernel-map step imports.

Ensemble inputs ``grid_coord (M, 3) INT32``, ``batch (M,) INT32`` (scene index of each row),
``feat (M, C) FP32`` and, for conditional (PDNorm / PPT) models only, ``condition (1,) INT64`` (index into
the ``ponder.conditions`` parameter); outputs ``backbone_feat (M, C_out) FP32`` and, when the graph was
exported with its head, ``seg_logits (M, K) FP32``: the same for every kind. The tables travel between the
steps inside the server; their data type is whatever the ONNX graph takes (read from its inputs).

Configs are Triton's own ``ModelConfig`` protobuf (shipped by tritonclient) written in its text format, so
every field name and enum is checked by protobuf. ``max_batch_size`` is 0 everywhere: a request is one or
more whole scenes with their own voxel counts at every UNet level, and the tables index rows *of that
request*, so Triton's batcher (which stacks equal shapes along a new axis) cannot merge requests. Several
scenes go in one request with distinct ``batch`` ids instead; concurrency comes from ``instance_group``.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2 as pb

from export.triton_folders import check_repository_output, swap_in

if TYPE_CHECKING:  # onnx and export.onnx_export (torch) only where a repository is written: the gateway
    import onnx     # reads configs with this module and has neither

    from export.graph import GraphInfo
    from model.checkpoint import LoadedModel

KINDS = ("python-onnxruntime", "python-torch", "onnxruntime", "tensorrt")
KERNEL_MAPS_FILE = "ponder_kernel_maps.py"
ENCODER_FILES = {"python-onnxruntime": ("python", "ponder_onnx_encoder.py"),
                 "python-torch": ("python", "ponder_torch_encoder.py"),
                 "onnxruntime": ("onnxruntime", "model.onnx"), "tensorrt": ("tensorrt", "model.plan")}
ENCODER_TEMPLATES = {"python-onnxruntime": "onnx_encoder.py", "python-torch": "torch_encoder.py"}
PYTHON_KINDS = tuple(ENCODER_TEMPLATES)  # Python-backend encoders: CPU instances by default
DEVICES = {"gpu": pb.ModelInstanceGroup.KIND_GPU, "cpu": pb.ModelInstanceGroup.KIND_CPU}
TEMPLATES = Path(__file__).resolve().parent / "triton_models"
ONNX_TO_TRITON = {6: pb.TYPE_INT32, 7: pb.TYPE_INT64, 1: pb.TYPE_FP32}  # onnx.TensorProto INT32, INT64, FLOAT
GATEWAY_INPUTS = ("grid_coord", "batch", "feat", "condition")
KERNEL_MAPS_SUFFIX, ENCODER_SUFFIX = "_kernel_maps", "_encoder"

Spec = tuple[str, int, list[int]]  # (tensor name, Triton data type, dims; -1 = dynamic)


def step_names(name: str) -> tuple[str, str]:
    """(kernel-map model, encoder model) of the ensemble ``name``."""
    return name + KERNEL_MAPS_SUFFIX, name + ENCODER_SUFFIX


def builds_own_tables(kind: str) -> bool:
    """The python-torch encoder builds the kernel maps itself (no tables through shared memory); every other
    kind's encoder takes them from the kernel-map step."""
    return kind == "python-torch"


def model_folders(name: str, kind: str) -> tuple[str, ...]:
    """The model folders an export of ``kind`` named ``name`` writes: the ensemble first, then its steps."""
    maps_name, encoder_name = step_names(name)
    return (name, encoder_name) if builds_own_tables(kind) else (name, maps_name, encoder_name)


def graph_specs(onnx_model: onnx.ModelProto, info: GraphInfo) -> tuple[list[Spec], list[Spec]]:
    """(inputs, outputs) of the exported graph, with data types read from the ONNX file."""
    types = {v.name: v.type.tensor_type.elem_type for v in onnx_model.graph.input}
    missing = [n for n in info.input_names if n not in types]
    if missing:
        raise ValueError(f"the ONNX graph lacks the inputs {missing} that its metadata names")
    widths = {"feat": info.in_channels, "stem_nbr": info.stem_kernel**3, "condition": None}
    inputs = []
    for n in info.input_names:
        if types[n] not in ONNX_TO_TRITON:
            import onnx

            raise ValueError(f"ONNX input {n!r} has element type {onnx.TensorProto.DataType.Name(types[n])}; "
                             f"expected one of INT32, INT64, FLOAT")
        width = widths.get(n, 27 if n.startswith("subm") else 8)
        inputs.append((n, ONNX_TO_TRITON[types[n]], [1] if n == "condition" else [-1, width]))
    outputs: list[Spec] = [("backbone_feat", pb.TYPE_FP32, [-1, info.out_channels])]
    if "seg_logits" in info.outputs:
        classes = set(info.num_classes.values())
        outputs.append(("seg_logits", pb.TYPE_FP32, [-1, classes.pop() if len(classes) == 1 else -1]))
    return inputs, outputs


def _base(name: str, backend: str = "", platform: str = "") -> pb.ModelConfig:
    config = pb.ModelConfig(name=name, max_batch_size=0)
    if backend:
        config.backend = backend
    if platform:
        config.platform = platform
    config.version_policy.latest.num_versions = 1
    return config


def _add(repeated, specs: list[Spec]) -> None:
    for n, dtype, dims in specs:
        repeated.add(name=n, data_type=dtype, dims=dims)


def gateway_specs(info: GraphInfo, inputs: list[Spec]) -> list[Spec]:
    """The ensemble's inputs: what the gateway has after voxelising."""
    specs: list[Spec] = [("grid_coord", pb.TYPE_INT32, [-1, 3]), ("batch", pb.TYPE_INT32, [-1]),
                         ("feat", pb.TYPE_FP32, [-1, info.in_channels])]
    return specs + [s for s in inputs if s[0] == "condition"]


def kernel_maps_config(info: GraphInfo, name: str, inputs: list[Spec], device: str, instances: int) -> pb.ModelConfig:
    """Step 1 (Python backend): checks the request and builds the tables on the instance's device."""
    config = _base(name, backend="python")
    config.default_model_filename = KERNEL_MAPS_FILE
    _add(config.input, gateway_specs(info, inputs))
    _add(config.output, [s for s in inputs if s[0] not in GATEWAY_INPUTS])
    config.instance_group.add(kind=DEVICES[device], count=instances)
    params = {"ponder.step": "kernel_maps", "ponder.num_levels": str(info.num_levels),
              "ponder.stem_kernel": str(info.stem_kernel), "ponder.in_channels": str(info.in_channels),
              "ponder.num_conditions": str(len(info.conditions))}
    for key, value in params.items():
        config.parameters[key].string_value = value
    return config


def encoder_config(info: GraphInfo, name: str, kind: str, inputs: list[Spec], outputs: list[Spec], device: str,
                   instances: int, threads: int = 0) -> pb.ModelConfig:
    """Step 2: the exported graph in the backend of ``kind`` (the tables in); for python-torch the only step
    (the gateway's tensors in, checked as the kernel-map step checks them)."""
    backend, filename = ENCODER_FILES[kind]
    config = _base(name, backend=backend)
    config.default_model_filename = filename
    _add(config.input, gateway_specs(info, inputs) if builds_own_tables(kind) else inputs)
    _add(config.output, outputs)
    config.instance_group.add(kind=DEVICES[device], count=instances)
    params = {"ponder.step": "encoder"}
    if kind in PYTHON_KINDS:
        params["ponder.threads"] = str(threads)
    if builds_own_tables(kind):
        params.update({"ponder.in_channels": str(info.in_channels), "ponder.num_conditions": str(len(info.conditions))})
    for key, value in params.items():
        config.parameters[key].string_value = value
    return config


def ensemble_config(info: GraphInfo, name: str, inputs: list[Spec], outputs: list[Spec],
                    extra: dict[str, str] | None = None, own_tables: bool = False) -> pb.ModelConfig:
    """The model clients call: gateway tensors in, encoder outputs out, tables passed inside the server
    (``own_tables``: one step, the encoder, which builds them itself)."""
    maps_name, encoder_name = step_names(name)
    config = _base(name, platform="ensemble")
    _add(config.input, gateway_specs(info, inputs))
    _add(config.output, outputs)
    if own_tables:
        encoder = config.ensemble_scheduling.step.add(model_name=encoder_name, model_version=-1)
        for n, _, _ in gateway_specs(info, inputs):
            encoder.input_map[n] = n
    else:
        maps = config.ensemble_scheduling.step.add(model_name=maps_name, model_version=-1)
        for n, _, _ in gateway_specs(info, inputs):
            maps.input_map[n] = n
        encoder = config.ensemble_scheduling.step.add(model_name=encoder_name, model_version=-1)
        for n, _, _ in inputs:
            encoder.input_map[n] = n
            if n not in GATEWAY_INPUTS:
                maps.output_map[n] = n
    for n, _, _ in outputs:
        encoder.output_map[n] = n
    from export.onnx_export import metadata

    for key, value in {**(extra or {}), **metadata(info)}.items():  # what a client needs to build a model card
        config.parameters[key].string_value = value
    return config


# Folder names Triton and its Python backend handle: a space made both stubs die at start (``stol``) and the
# server wait for them for ever; a newline or shell characters would end up in configs and logs.
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


def check_model_name(name: str) -> None:
    """ValueError for a name Triton cannot serve as a model folder (letters, digits, ``_ . -``; 100 at most)."""
    if not MODEL_NAME.fullmatch(name or ""):
        raise ValueError(f"invalid Triton model name {name!r}: use letters, digits, '_', '.' and '-' (starting with "
                         "a letter or digit, at most 100)")


def check_no_clash(out_dir: Path, name: str, kind: str) -> tuple[str, ...]:
    """ValueError when writing the ensemble ``name`` would replace a folder of ``out_dir`` that is not part of an
    earlier export of ``name``: another ensemble's step (e.g. ``--name ponder_encoder`` beside ``ponder``) or an
    unrelated model. Only the folder ``name`` and the steps its ensemble lists are ever replaced. Returns the
    steps of the earlier export that this one drops (``NAME_kernel_maps`` when python-torch replaces another
    kind), which go with it unless another ensemble lists them."""
    steps: dict[str, set[str]] = {}  # model folder -> the steps it lists (empty: not an ensemble)
    for config_path in sorted(out_dir.glob("*/config.pbtxt")) if out_dir.is_dir() else []:
        try:
            steps[config_path.parent.name] = {s.model_name for s in read_model_config(config_path)
                                              .ensemble_scheduling.step}
        except (OSError, text_format.ParseError):  # unreadable: not an ensemble we could break
            steps[config_path.parent.name] = set()
    written = model_folders(name, kind)
    for folder in written:
        users = sorted(model for model, listed in steps.items() if folder in listed and model != name)
        if users:
            raise ValueError(f"{out_dir / folder} is a step of the ensemble {users[0]!r} there; exporting --name "
                             f"{name!r} would replace it. Choose another --name")
        if folder != name and (out_dir / folder).exists() and folder not in steps.get(name, set()):
            raise ValueError(f"{out_dir / folder} holds a model that is not part of an export of {name!r}; exporting "
                             f"--name {name!r} would replace it. Choose another --name")
    earlier = steps.get(name, set())
    used_by_others = set().union(*(listed for model, listed in steps.items() if model != name))
    return tuple(folder for folder in step_names(name)
                 if folder in earlier and folder not in written and folder not in used_by_others
                 and (out_dir / folder).is_dir())


def repository_configs(onnx_path: str | Path, name: str, kind: str = "onnxruntime", device: str | None = None,
                       instance_count: int = 1, max_batch_size: int = 0, threads: int = 0) -> dict[str, pb.ModelConfig]:
    """Model name -> config of each model of `model_folders` (ensemble first), validated; nothing is written."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {list(KINDS)}, got {kind!r}")
    device = device or ("cpu" if kind in PYTHON_KINDS else "gpu")
    if device not in DEVICES:
        raise ValueError(f"device must be one of {sorted(DEVICES)}, got {device!r}")
    if kind == "tensorrt" and device == "cpu":
        raise ValueError("a TensorRT plan runs on GPUs only; use kind='onnxruntime' for CPU instances")
    if max_batch_size != 0:
        raise ValueError("max_batch_size must be 0: requests are ragged scenes whose tables index their own rows, "
                         "so Triton cannot batch them (batch scenes in one request instead)")
    if instance_count < 1:
        raise ValueError(f"instance_count must be >= 1, got {instance_count}")
    check_model_name(name)
    import onnx

    from export.onnx_export import ExportError, load_onnx, read_info

    model = load_onnx(onnx_path)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        first = " ".join(str(exc).split())[:300] or type(exc).__name__  # the checker's lines break mid-sentence
        raise ExportError(f"{onnx_path}: not a valid ONNX model ({first})") from None
    try:
        info = read_info(model)
    except ExportError as exc:
        raise ExportError(f"{onnx_path}: {exc}") from None
    try:
        inputs, outputs = graph_specs(model, info)
    except ValueError as exc:
        raise ExportError(f"{onnx_path}: {exc}") from None
    extra = {p.key: p.value for p in model.metadata_props if p.key.startswith("ponder.")}
    maps_name, encoder_name = step_names(name)
    configs = {name: ensemble_config(info, name, inputs, outputs, extra, own_tables=builds_own_tables(kind))}
    if not builds_own_tables(kind):
        configs[maps_name] = kernel_maps_config(info, maps_name, inputs, device, instance_count)
    configs[encoder_name] = encoder_config(info, encoder_name, kind, inputs, outputs, device, instance_count, threads)
    return configs


def check_plan_source(kind: str, plan_path: str | Path | None) -> None:
    """For kind="tensorrt": the prebuilt plan is a non-empty file, or TensorRT is here to build one
    (TensorRTUnavailable); nothing for the other kinds."""
    if kind != "tensorrt":
        return
    if plan_path is not None:
        plan = Path(plan_path)
        if not plan.is_file():
            raise FileNotFoundError(f"--plan {plan}: " + ("is a folder, not a TensorRT engine file" if plan.is_dir()
                                                          else "no such TensorRT engine file"))
        if plan.stat().st_size == 0:
            raise ValueError(f"--plan {plan}: the file is empty, not a TensorRT engine")
        return
    from export.tensorrt import TensorRTUnavailable, tensorrt_available

    if not tensorrt_available():
        raise TensorRTUnavailable("TensorRT is not installed (pip install 'ponder-serve[tensorrt]' on a GPU host)")


def check_weights_source(kind: str, weights: LoadedModel | None, exported_digest: str | None = None) -> None:
    """For kind="python-torch": ``weights`` are given and, when the ONNX file recorded its weights' digest
    (``exported_digest``), are those it was exported from (ValueError otherwise); nothing for the other kinds."""
    if kind != "python-torch":
        return
    if weights is None:
        raise ValueError("--kind python-torch runs the checkpoint's weights in the torch engine: pass the "
                         "checkpoint, not an exported .onnx file")
    from export.onnx_export import weights_digest

    if exported_digest is not None and exported_digest != weights_digest(weights.state_dict()):
        raise ValueError("the ONNX file was exported from other weights than the checkpoint given")


def write_triton_repository(out_dir: str | Path, onnx_path: str | Path, name: str, max_batch_size: int = 0,
                            instance_count: int = 1, kind: str = "onnxruntime", device: str | None = None,
                            plan_path: str | Path | None = None, threads: int = 0,
                            weights: LoadedModel | None = None) -> Path:
    """Write the ensemble and its steps under ``out_dir`` (see the module docstring); returns the
    ensemble's folder. device: instance kind of the steps (default: cpu for the python-* kinds, gpu
    otherwise). For kind="tensorrt", ``plan_path`` is the engine built from the ONNX file
    (`export.tensorrt.build_engine`); without one it is built here, which needs TensorRT and a GPU.
    threads: intra-op threads of a python-* encoder (0 = its library's default). For kind="python-torch",
    ``weights`` is the checkpoint the ONNX file was exported from (its ``ponder.weights_sha256`` must match): the
    configs still come from the ONNX file, so every kind serves the same tensors and model card.

    All-or-nothing: the inputs are checked first, the model folders are built in a temporary folder beside
    ``out_dir``, and only a complete build replaces them (each as a whole, so no file of an earlier export
    stays beside the new ones; a step the earlier export had and this one has not goes; other models in
    ``out_dir`` are left alone). A failure leaves an existing repository as it was and no partial one in a
    new folder."""
    out_dir = check_repository_output(out_dir)
    configs = repository_configs(onnx_path, name, kind, device, instance_count, max_batch_size, threads)
    dropped = check_no_clash(out_dir, name, kind)
    check_plan_source(kind, plan_path)
    params = configs[name].parameters
    check_weights_source(kind, weights, params["ponder.weights_sha256"].string_value
                         if "ponder.weights_sha256" in params else None)
    maps_name, encoder_name = step_names(name)
    parent = out_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=parent, prefix=f".{out_dir.name}.partial-"))
    try:
        built = staging / "repo"
        for model_name, config in configs.items():
            (built / model_name / "1").mkdir(parents=True)  # an ensemble needs a version folder too
            (built / model_name / "config.pbtxt").write_text(text_format.MessageToString(config))
        if maps_name in configs:
            shutil.copyfile(TEMPLATES / "kernel_maps.py", built / maps_name / "1" / KERNEL_MAPS_FILE)
        version = built / encoder_name / "1"
        if kind in ENCODER_TEMPLATES:
            shutil.copyfile(TEMPLATES / ENCODER_TEMPLATES[kind], version / ENCODER_FILES[kind][1])
        if kind in ("python-onnxruntime", "onnxruntime"):
            shutil.copyfile(onnx_path, version / "model.onnx")
        elif kind == "python-torch":
            from model.checkpoint import save_checkpoint

            save_checkpoint(weights.inference_model, weights.config, version / "checkpoint")
        elif plan_path is not None:
            shutil.copyfile(plan_path, version / "model.plan")
        else:
            from export.tensorrt import build_engine

            build_engine(onnx_path, version / "model.plan")
        swap_in(built, out_dir, list(configs), staging, remove=dropped)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir / name


def read_model_config(path: str | Path) -> pb.ModelConfig:
    """Parse a ``config.pbtxt`` (file or model folder) with Triton's protobuf schema."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.pbtxt"
    return text_format.Parse(path.read_text(), pb.ModelConfig())


def parse_config_json(data: dict) -> pb.ModelConfig:
    """A config as a server returns it in JSON (``get_model_config(..., as_json=True)``) as a ModelConfig."""
    return json_format.ParseDict(data.get("config", data), pb.ModelConfig(), ignore_unknown_fields=True)


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

"""Export a GatherSpUNet to ONNX with a dynamic number of voxels at every UNet level.

The graph holds only Gather / MatMul / Gemm / elementwise ops over the int32 kernel-map tables (computed
outside the model by `model.sparse.kernel_maps`), so it is exact in onnxruntime: no Scatter op is
allowed in the result (ScatterElements is wrong with repeated indices, ScatterND(add) is
non-deterministic in onnxruntime with >= 2 threads).

Both torch exporters work on this graph (only Gather/MatMul/elementwise). The TorchScript exporter is
the default: it exports the default-size SpUNet in seconds, while the dynamo exporter
(``exporter="dynamo"``, needs onnxscript) spends minutes in torch.export and the ONNX translation of
the ~2,600-node graph and gives the same numbers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import onnx
import torch

from export.graph import GatherSpUNet, GraphInfo  # GatherSpUNet: model.engine's gather formulation
from export.node_order import order_for_onnxruntime
from model.files import replaced_on_success
from model.sparse.kernel_maps import KernelMaps

log = logging.getLogger(__name__)

FORBIDDEN_OPS = ("ScatterND", "ScatterElements", "Scatter")
METADATA_PREFIX = "ponder."
DEFAULT_OPSET = 18
MIN_OPSET = 9  # below it the graph's ops (ConstantOfShape, Cast attributes) do not exist in ONNX
MIN_DYNAMO_OPSET = 18  # the dynamo exporter translates to opset 18 and newer
MAX_TAPS_PER_MATMUL = 27  # one GEMM per 3x3x3 conv; more taps than a conv has change nothing


class ExportError(RuntimeError):
    """The exported graph is invalid or contains ops that would be wrong at run time."""


def opset_range(exporter: str = "torchscript") -> tuple[int, int]:
    """(lowest, highest) ONNX opset the exporter can write for this graph."""
    from torch.onnx import _constants

    if exporter == "dynamo":
        return MIN_DYNAMO_OPSET, int(getattr(_constants, "ONNX_MAX_OPSET", 23))
    return MIN_OPSET, int(getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", 20))


def check_export_options(opset: int, exporter: str = "torchscript", taps_per_matmul: int | None = None,
                         opset_name: str = "opset", taps_name: str = "taps_per_matmul") -> None:
    """Refuse an opset the exporter cannot write and a taps_per_matmul outside 1..27 (ValueError naming the
    option: ``*_name`` are the flags of the command that asks), before any model work."""
    if exporter not in ("dynamo", "torchscript"):
        raise ValueError(f"exporter must be 'dynamo' or 'torchscript', got {exporter!r}")
    lo, hi = opset_range(exporter)
    if not lo <= opset <= hi:
        raise ValueError(f"{opset_name} must be {lo}-{hi} for the {exporter} exporter, got {opset}")
    if taps_per_matmul is not None and not 1 <= taps_per_matmul <= MAX_TAPS_PER_MATMUL:
        raise ValueError(f"{taps_name} must be 1-{MAX_TAPS_PER_MATMUL} ({MAX_TAPS_PER_MATMUL} = one matmul per 3x3x3 "
                         f"conv; leave it out for the default), got {taps_per_matmul}")


def load_onnx(path: str | Path) -> onnx.ModelProto:
    """An ONNX file's model (external data not loaded); FileNotFoundError when it is missing, ExportError naming
    the file when it is not a file or not a readable ONNX model (truncated, another format)."""
    from google.protobuf.message import DecodeError

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such ONNX model")
    if not path.is_file():
        raise ExportError(f"{path}: is a folder, not an ONNX model file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeWarning) as exc:
        raise ExportError(f"{path}: not a readable ONNX model (truncated or another format: {exc})") from None
    except OSError as exc:
        raise ExportError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    if not model.graph.node:
        raise ExportError(f"{path}: not an ONNX model (its graph is empty)")
    return model


def example_scene(num_points: int = 3000, extent: int = 40, seed: int = 0) -> np.ndarray:
    """(M, 3) unique voxel coordinates on a box's floor and walls: a tiny room used to trace the graph."""
    rng = np.random.default_rng(seed)
    pts = rng.integers(0, extent, size=(num_points, 3))
    wall = rng.integers(0, 3, size=num_points)
    pts[np.arange(num_points), wall] = rng.integers(0, 2, size=num_points) * (extent - 1)
    return np.unique(pts, axis=0)


def example_inputs(graph: GatherSpUNet, maps: KernelMaps | None = None) -> tuple[torch.Tensor, ...]:
    if maps is None:
        maps = graph.kernel_maps(example_scene())
    feat = torch.randn(maps.num_sites[0], graph.info.in_channels, generator=torch.Generator().manual_seed(0))
    return graph.example_inputs(maps, feat, condition=0)


def _dynamic_shapes(info: GraphInfo) -> tuple:
    levels = info.num_levels
    m = [torch.export.Dim(f"m{l}", min=2) for l in range(levels)]
    shapes: list = [{0: m[0]}, {0: m[0]}]  # feat, stem
    shapes += [{0: m[l]} for l in range(levels)]  # subm tables
    shapes += [{0: m[l + 1]} for l in range(levels - 1)]  # down maps: one row per coarse site
    shapes += [{0: m[l]} for l in range(levels - 1)]  # up maps: one row per fine site
    if info.conditions:
        shapes.append(None)  # condition: always (1,)
    return (shapes[0], tuple(shapes[1:]))  # forward(feat, *inputs)


def _dynamic_axes(info: GraphInfo) -> dict[str, dict[int, str]]:
    names = info.input_names
    axes: dict[str, dict[int, str]] = {}
    for name in names:
        if name in ("feat", "stem_nbr", "up0_map"):
            axes[name] = {0: "m0"}
        elif name.startswith("subm"):
            axes[name] = {0: f"m{name[4:].split('_')[0]}"}
        elif name.startswith("down"):
            axes[name] = {0: f"m{int(name[4:].split('_')[0]) + 1}"}
        elif name.startswith("up"):
            axes[name] = {0: f"m{name[2:].split('_')[0]}"}
    for name in info.outputs:
        axes[name] = {0: "m0"} if name == "backbone_feat" else {0: "m0", 1: "num_classes"}
    return axes


def metadata(info: GraphInfo, extra: dict[str, str] | None = None) -> dict[str, str]:
    """metadata_props of the exported model: everything a runner needs besides the tensors."""
    meta = {
        "kind": info.kind,
        "backbone": info.backbone,
        "in_channels": str(info.in_channels),
        "out_channels": str(info.out_channels),
        "num_levels": str(info.num_levels),
        "stem_kernel": str(info.stem_kernel),
        "conditions": json.dumps(list(info.conditions)),
        "num_classes": json.dumps(info.num_classes),
        "class_names": json.dumps({k: list(v) for k, v in info.class_names.items()}),
        "grid_size": repr(info.grid_size),
        "input_features": json.dumps(list(info.input_features)),
        "inputs": json.dumps(info.input_names),
        "outputs": json.dumps(list(info.outputs)),
        "table_format": "zero-row-v1",  # missing neighbour = number of input rows (appended zero row)
        "table_dtype": "int32",  # every table input (model.sparse.kernel_maps tables are int32)
    }
    return {METADATA_PREFIX + k: v for k, v in {**meta, **(extra or {})}.items()}


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 of a state_dict's names and bytes, stored in an export (``ponder.weights_sha256``) so that an
    engine passed with ``--engine`` can be checked against the checkpoint it is used with."""
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def ponder_metadata(model: onnx.ModelProto) -> dict[str, str]:
    """The ``ponder.*`` metadata_props of an exported model, without the prefix."""
    return {p.key[len(METADATA_PREFIX):]: p.value for p in model.metadata_props if p.key.startswith(METADATA_PREFIX)}


def read_info(model: onnx.ModelProto | str | Path) -> GraphInfo:
    """GraphInfo back from an exported model's metadata_props."""
    if not isinstance(model, onnx.ModelProto):
        model = load_onnx(model)
    props = ponder_metadata(model)
    if "kind" not in props:
        raise ExportError("the ONNX model has no ponder metadata; was it exported by `ponder export onnx`?")
    return GraphInfo(
        kind=props["kind"], backbone=props["backbone"], in_channels=int(props["in_channels"]),
        out_channels=int(props["out_channels"]), num_levels=int(props["num_levels"]),
        stem_kernel=int(props["stem_kernel"]), conditions=tuple(json.loads(props["conditions"])),
        outputs=tuple(json.loads(props["outputs"])), num_classes=json.loads(props["num_classes"]),
        class_names={k: tuple(v) for k, v in json.loads(props["class_names"]).items()},
        grid_size=float(props["grid_size"]), input_features=tuple(json.loads(props["input_features"])))


def check_graph(model: onnx.ModelProto) -> None:
    """Refuse Scatter ops anywhere in the graph (including subgraphs)."""
    def walk(graph: onnx.GraphProto):
        for node in graph.node:
            yield node
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    yield from walk(attr.g)

    bad = sorted({n.op_type for n in walk(model.graph) if n.op_type in FORBIDDEN_OPS})
    if bad:
        raise ExportError(f"exported graph contains {bad}; these are wrong or non-deterministic in onnxruntime")


def export_onnx(graph: GatherSpUNet, path: str | Path, opset: int = DEFAULT_OPSET, exporter: str = "torchscript",
                maps: KernelMaps | None = None, extra_metadata: dict[str, str] | None = None) -> Path:
    """Write ``path`` (a single .onnx file); returns it. Checks the model and the op set. The model is written
    to a temporary file beside ``path`` and renamed over it only once the ONNX checker passed: a failed export
    leaves an earlier ``path`` as it was and no invalid file."""
    check_export_options(opset, exporter)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    graph = graph.eval()
    info = graph.info
    args = example_inputs(graph, maps)
    # A private folder beside the output (same file system, so the final rename is atomic; unique, so no
    # user file is overwritten), removed whatever happens.
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as work:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if exporter == "dynamo":
                program = torch.onnx.export(graph, args, dynamo=True, opset_version=opset,
                                            input_names=info.input_names, output_names=list(info.outputs),
                                            dynamic_shapes=_dynamic_shapes(info), optimize=True, verbose=False)
                model = program.model_proto
            else:
                traced = Path(work) / "torchscript.onnx"
                torch.onnx.export(graph, args, str(traced), dynamo=False, opset_version=opset,
                                  input_names=info.input_names, output_names=list(info.outputs),
                                  dynamic_axes=_dynamic_axes(info))
                model = onnx.load(str(traced))
                traced.unlink()
        _name_dims(model, info)
        del model.metadata_props[:]
        extra = {"taps_per_matmul": str(graph.taps_per_matmul or "auto"), **(extra_metadata or {})}
        onnx.helper.set_model_props(model, metadata(info, extra))
        model.producer_name = "ponder-serve"
        order_for_onnxruntime(model.graph)  # listed so onnxruntime's default order runs one gather at a time
        check_graph(model)
        with replaced_on_success(path, Path(work) / "model.onnx") as tmp:
            onnx.save_model(model, str(tmp))
            try:
                onnx.checker.check_model(str(tmp), full_check=True)
            except onnx.checker.ValidationError as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise ExportError(f"the exported model fails the ONNX checker (opset {opset}): {first}; "
                                  f"{path} was not written") from exc
    log.info("exported %s (%s exporter, opset %d, %d nodes)", path, exporter, opset, len(model.graph.node))
    return path


def _name_dims(model: onnx.ModelProto, info: GraphInfo) -> None:
    """Stable dims whatever the exporter called them: m0.. for voxels per level, fixed channel counts,
    and ``num_classes`` only where it depends on the condition. Runners and Triton configs rely on them."""
    axes = _dynamic_axes(info)
    classes = set(info.num_classes.values())
    fixed = {"backbone_feat": info.out_channels, "seg_logits": classes.pop() if len(classes) == 1 else None}
    for value in list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        for axis, name in axes.get(value.name, {}).items():
            dims[axis].Clear()
            if value.name in fixed and axis == 1 and fixed[value.name] is not None:
                dims[axis].dim_value = fixed[value.name]
            else:
                dims[axis].dim_param = name
        if value.name == "backbone_feat":
            dims[1].Clear()
            dims[1].dim_value = info.out_channels


def describe(path: str | Path) -> dict:
    """Inputs, outputs (with symbolic shapes), opset, op histogram and metadata of an exported model."""
    model = load_onnx(path)

    def shape(v):
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    ops: dict[str, int] = {}
    for node in model.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return {
        "inputs": {v.name: shape(v) for v in model.graph.input},
        "outputs": {v.name: shape(v) for v in model.graph.output},
        "opset": max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
        "ops": dict(sorted(ops.items())),
        "info": asdict(read_info(model)),
    }

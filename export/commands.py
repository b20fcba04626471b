"""``ponder export onnx | tensorrt | triton-repo``: the spconv-free gather graph for deployment.

Picked up by ``model.cli`` through `add_commands`; heavy imports happen inside the handlers.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # heavy imports stay inside the handlers
    from model.checkpoint import LoadedModel


def add_export_arguments(subparsers: argparse._SubParsersAction) -> None:
    """Add ``export`` with its three subcommands."""
    export = subparsers.add_parser("export", help="export a checkpoint to ONNX / TensorRT / a Triton repository")
    sub = export.add_subparsers(dest="export_command", metavar="TARGET", required=True)

    p = sub.add_parser("onnx", help="ONNX model of the encoder (+ head), dynamic voxel counts at every level")
    _checkpoint_arguments(p)
    p.add_argument("-o", "--output", required=True, help="output .onnx file")
    p.add_argument("--exporter", choices=("torchscript", "dynamo"), default="torchscript",
                   help="torch ONNX exporter (dynamo works but takes minutes on this graph)")
    p.add_argument("--opset", type=int, default=18)
    p.add_argument("--taps-per-matmul", type=int, default=None, metavar="N",
                   help="taps gathered into one matmul (default: one per tap, memory-lean; 27 = one GEMM per 3x3x3 "
                        "conv, faster in onnxruntime but needs voxels x 27 x channels floats per conv)")
    p.set_defaults(handler=run_onnx)

    p = sub.add_parser("tensorrt", help="TensorRT engine from an exported ONNX model (needs tensorrt + a GPU)")
    p.add_argument("onnx", help="model exported by `ponder export onnx`")
    p.add_argument("-o", "--output", required=True, help="output .plan file")
    p.add_argument("--profile", action="append", metavar="MIN:OPT:MAX",
                   help="voxel-count range of one optimisation profile (repeatable; default 1:30000:60000 and "
                        "60000:130000:400000)")
    p.add_argument("--fp16", action="store_true", help="allow FP16 kernels")
    p.add_argument("--workspace-gib", type=float, default=4.0)
    p.set_defaults(handler=run_tensorrt)

    p = sub.add_parser("triton-repo", help="Triton model repository: an ensemble (kernel maps -> encoder) that takes "
                                           "grid_coord/batch/feat[/condition]")
    p.add_argument("model", help="exported .onnx, or a checkpoint (exported to ONNX on the way)")
    p.add_argument("-o", "--output", required=True, help="repository folder (created if missing)")
    p.add_argument("--name", default="ponder", help="Triton model name of the ensemble (the name clients call)")
    p.add_argument("--kind", choices=("onnxruntime", "tensorrt", "python-onnxruntime", "python-torch"),
                   default="onnxruntime",
                   help="encoder step: Triton's onnxruntime backend, a TensorRT plan, the ONNX file in onnxruntime "
                        "inside a Python-backend model (for Triton builds with only the Python backend, e.g. "
                        "nvidia-pytriton's), or the checkpoint in ponder's torch engine inside a Python-backend "
                        "model (the fast CPU worker; needs a checkpoint, not an .onnx)")
    p.add_argument("--device", choices=("gpu", "cpu"), default=None,
                   help="instance_group kind of both steps (default: cpu for the python-* kinds, else gpu)")
    p.add_argument("--instances", type=int, default=1, help="instance_group count")
    p.add_argument("--threads", type=int, default=0,
                   help="python-* kinds: intra-op threads of onnxruntime or torch (0: the library's default)")
    p.add_argument("--plan", help="prebuilt TensorRT engine for --kind tensorrt (else it is built here)")
    p.add_argument("--features-only", action="store_true", help="when exporting a checkpoint: no head")
    p.add_argument("--trust-checkpoint", action="store_true")
    p.set_defaults(handler=run_triton_repo)


add_commands = add_export_arguments  # the name model.cli looks for


def _checkpoint_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="official .pth or our checkpoint folder")
    p.add_argument("--features-only", action="store_true", help="export the encoder only (no segmentation head)")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow full unpickling of the checkpoint (only for files you trust)")


IMAGE_KINDS = ("image-render", "image-segment")


def _check_checkpoint_kind(checkpoint: str) -> None:
    """An image model folder (``ponder images``) has no point-cloud encoder to export: say so in one line
    instead of a dump of config keys the point-cloud loader does not know."""
    from model.errors import CommandError
    from model.images.checkpoint import config_kind

    path = Path(checkpoint)
    if path.suffix.lower() == ".onnx":
        raise CommandError(f"{checkpoint} is already an ONNX file; `ponder export onnx` takes a checkpoint (pass the "
                           "ONNX file to `ponder export triton-repo`, or to `ponder features --engine`)")
    kind = config_kind(path) if path.is_dir() else None
    if kind in IMAGE_KINDS:
        raise CommandError(f"{checkpoint} is an image model (kind {kind}); image models cannot be exported, "
                           f"only point-cloud encoders (run it with `ponder images`)")


def _check_onnx_output(output: str | Path) -> Path:
    """``-o`` of ``export onnx``, checked before any model work: an .onnx file path whose folder accepts
    new files (named in the message, never a temporary file or a bare errno)."""
    from export.triton_folders import creation_problem
    from model.errors import CommandError

    path = Path(output)
    if path.is_dir():
        raise CommandError(f"-o {path}: is a folder; -o takes the .onnx file to write")
    if path.suffix.lower() != ".onnx":
        suggestion = path.with_suffix(".onnx") if path.suffix else Path(str(path) + ".onnx")
        raise CommandError(f"-o {path}: the model is written as ONNX; name the file {suggestion}")
    problem = creation_problem(path)
    if problem:
        raise CommandError(f"-o {path}: {problem}")
    return path


def _load(checkpoint: str, trust: bool) -> LoadedModel:
    """A point-cloud checkpoint (an image model or an .onnx file is refused in one line)."""
    from model.checkpoint import load_checkpoint

    _check_checkpoint_kind(checkpoint)
    return load_checkpoint(checkpoint, trust=trust)


def _export(loaded: LoadedModel, output: Path, features_only: bool, exporter: str = "torchscript", opset: int = 18,
            taps_per_matmul: int | None = None) -> Path:
    from export.graph import GatherSpUNet
    from export.onnx_export import ExportError, export_onnx, weights_digest
    from model.errors import CommandError

    graph = GatherSpUNet.from_loaded(loaded, heads=not features_only, taps_per_matmul=taps_per_matmul)
    try:
        return export_onnx(graph, output, opset=opset, exporter=exporter,
                           extra_metadata={"name": loaded.config.name,
                                           "weights_sha256": weights_digest(loaded.state_dict())})
    except ExportError as exc:
        raise CommandError(str(exc)) from exc


def run_onnx(args) -> int:
    from export.onnx_export import check_export_options, describe

    check_export_options(args.opset, args.exporter, args.taps_per_matmul, opset_name="--opset",
                         taps_name="--taps-per-matmul")
    output = _check_onnx_output(args.output)
    path = _export(_load(args.checkpoint, args.trust_checkpoint), output, args.features_only, args.exporter,
                   args.opset, args.taps_per_matmul)
    desc = describe(path)
    print(f"wrote {path}: inputs {list(desc['inputs'])}, outputs {desc['outputs']}", file=sys.stderr)
    return 0


def _profile(text: str):
    from export.tensorrt import VoxelRange

    try:
        lo, opt, hi = (int(v) for v in text.split(":"))
    except ValueError as exc:
        raise ValueError(f"--profile must be MIN:OPT:MAX integers, got {text!r}") from exc
    return VoxelRange(lo, opt, hi)


def run_tensorrt(args) -> int:
    from export.tensorrt import DEFAULT_PROFILES, TensorRTUnavailable, build_engine
    from model.errors import CommandError

    profiles = tuple(_profile(p) for p in args.profile) if args.profile else DEFAULT_PROFILES
    try:
        plan = build_engine(args.onnx, args.output, profiles=profiles, fp16=args.fp16,
                            workspace_gib=args.workspace_gib)
    except TensorRTUnavailable as exc:
        raise CommandError(str(exc)) from exc
    print(f"wrote {plan}", file=sys.stderr)
    return 0


def run_triton_repo(args) -> int:
    from export.onnx_export import ExportError
    from export.tensorrt import TensorRTUnavailable
    from export.triton_folders import check_repository_output
    from export.triton_repo import (check_model_name, check_no_clash, check_plan_source, check_weights_source,
                                    model_folders, read_model_config, write_triton_repository)
    from model.errors import CommandError

    model = Path(args.model)
    try:  # everything that can be checked before a checkpoint is exported or a file written
        check_repository_output(args.output, "-o")
        if args.instances < 1:
            raise CommandError(f"--instances must be >= 1, got {args.instances}")
        if args.threads < 0:
            raise CommandError(f"--threads must be >= 0 (0: the library's default), got {args.threads}")
        if args.kind == "tensorrt" and args.device == "cpu":
            raise CommandError("--kind tensorrt runs on GPUs only; use --kind onnxruntime, python-onnxruntime or "
                               "python-torch with --device cpu")
        check_plan_source(args.kind, args.plan)
        if args.kind == "python-torch" and model.suffix.lower() == ".onnx":
            check_weights_source(args.kind, None)  # refused: the torch engine needs the checkpoint
        check_model_name(args.name)
        dropped = check_no_clash(Path(args.output), args.name, args.kind)
    except ValueError as exc:
        raise CommandError(str(exc)) from None
    except TensorRTUnavailable as exc:
        raise CommandError(f"{exc}; or pass --plan with an engine built on a GPU host") from exc
    except OSError as exc:  # the checks' own messages name the path
        raise CommandError(str(exc)) from None
    replaced = [m for m in model_folders(args.name, args.kind) if (Path(args.output) / m).exists()]
    weights = None
    with tempfile.TemporaryDirectory() as tmp:
        if model.suffix.lower() != ".onnx":
            weights = _load(str(model), args.trust_checkpoint)
            model = _export(weights, Path(tmp) / "model.onnx", args.features_only)
        try:
            folder = write_triton_repository(args.output, model, args.name, instance_count=args.instances,
                                             kind=args.kind, device=args.device, plan_path=args.plan,
                                             threads=args.threads, weights=weights)
        except TensorRTUnavailable as exc:
            raise CommandError(f"{exc}; or pass --plan with an engine built on a GPU host") from exc
        except (ValueError, ExportError) as exc:
            raise CommandError(str(exc)) from exc
    config = read_model_config(folder)
    summary = {"repository": str(folder.parent), "model": config.name, "kind": args.kind,
               "steps": [s.model_name for s in config.ensemble_scheduling.step],
               "inputs": [i.name for i in config.input], "outputs": [o.name for o in config.output],
               "replaced": replaced, "removed": list(dropped)}
    print(json.dumps(summary), file=sys.stderr)
    return 0

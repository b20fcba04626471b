"""Model-core subcommands: features, segment, inspect, convert."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", "-c", help="official .pth or our checkpoint folder (default: the bundled model)")
    p.add_argument("--condition", help="dataset condition of PDNorm/PPT models (e.g. ScanNet, S3DIS, Structured3D)")
    p.add_argument("--grid-size", type=float, help="voxel size in metres (default: the model's, usually 0.02)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--format", dest="input_format", help="input format when the suffix does not tell")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow full unpickling of the checkpoint (only for files you trust)")
    p.add_argument("--backend", default="torch", choices=("torch", "onnxruntime", "tensorrt"),
                   help="encoder runtime: PyTorch/spconv, or the exported ONNX graph in onnxruntime (CPU/CUDA) or "
                        "onnxruntime's TensorRT provider")
    p.add_argument("--engine", help="exported .onnx encoder for --backend onnxruntime/tensorrt "
                                    "(default: export once and cache under ~/.cache/ponder)")


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("features", help="per-point encoder features of a point cloud")
    p.add_argument("input", help="point cloud: .ply .las .laz .npy .npz .pcd .xyz .txt .bin")
    p.add_argument("-o", "--output", required=True, help="output .npy (N x C float32, input order)")
    p.add_argument("--per-voxel", action="store_true",
                   help="write voxel features (M x C) and OUTPUT.point_to_voxel.npy instead of per-point rows")
    add_model_arguments(p)
    p.set_defaults(handler=run_features)

    p = subparsers.add_parser("segment", help="per-point semantic labels and logits")
    p.add_argument("input")
    p.add_argument("-o", "--output", required=True, help="output .npz with labels, logits, class_names")
    p.add_argument("--precise", action="store_true",
                   help="official precise mode: 13 test-time augmentations x fragments, probabilities voted")
    add_model_arguments(p)
    p.set_defaults(handler=run_segment)

    p = subparsers.add_parser("inspect", help="describe a checkpoint: kind, architecture, conditions, classes")
    p.add_argument("checkpoint", nargs="?", help="checkpoint (default: the bundled model)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--trust-checkpoint", action="store_true")
    p.set_defaults(handler=run_inspect)

    p = subparsers.add_parser("convert", help="convert an official checkpoint into our format")
    p.add_argument("checkpoint")
    p.add_argument("-o", "--output", required=True, help="output folder (model.safetensors + config.json)")
    p.add_argument("--name", help="model name recorded in the config")
    p.add_argument("--trust-checkpoint", action="store_true")
    p.set_defaults(handler=run_convert)


def _steps(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", file=sys.stderr, disable=not sys.stderr.isatty(),
                bar_format="{desc}: {n}/{total} {postfix}")


def _load(args):
    from model.pointcloud.readers import read_point_cloud

    progress = _steps(3, "ponder")
    progress.set_postfix_str(f"reading {args.input}")  # read first: bad input fails before the model loads
    cloud = read_point_cloud(Path(args.input), format=args.input_format)
    progress.update()
    progress.set_postfix_str("loading model")
    from model.inference import load_predictor  # imports spconv (seconds)

    predictor = load_predictor(args.checkpoint, device=args.device, trust_checkpoint=args.trust_checkpoint,
                               backend=args.backend, engine=args.engine)
    progress.update()
    progress.set_postfix_str(f"running on {len(cloud):,} points")
    return predictor, cloud, progress


def _write_npy(path: Path, array) -> None:
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)
    tmp.replace(path)


def run_features(args) -> int:
    predictor, cloud, progress = _load(args)
    result = predictor.features(cloud, args.condition, args.grid_size)
    progress.update()
    progress.close()
    out = Path(args.output)
    if args.per_voxel:
        _write_npy(out, result.voxel_features)
        _write_npy(out.with_suffix(".point_to_voxel.npy"), result.point_to_voxel)
    else:
        _write_npy(out, result.point_features())
    print(f"wrote {out}: {len(cloud):,} points, {len(result.voxel_features):,} voxels, "
          f"{result.voxel_features.shape[1]} channels", file=sys.stderr)
    return 0


def run_segment(args) -> int:
    import numpy as np

    predictor, cloud, progress = _load(args)
    result = predictor.segment(cloud, args.condition, args.grid_size, precise=args.precise)
    progress.update()
    progress.close()
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, labels=result.labels, logits=result.logits, class_names=np.array(result.class_names, dtype=str))
    counts = np.bincount(result.labels, minlength=len(result.class_names))
    top = ", ".join(f"{result.class_names[i]} {counts[i]:,}" for i in np.argsort(-counts)[:5] if counts[i])
    print(f"wrote {out}: {len(cloud):,} points; most frequent: {top}", file=sys.stderr)
    return 0


def describe(checkpoint: str | None, trust: bool = False) -> dict:
    from model.checkpoint import load_checkpoint
    from model.inference import default_checkpoint

    loaded = load_checkpoint(checkpoint or default_checkpoint(), trust=trust)
    cfg = loaded.config
    params = sum(p.numel() for p in loaded.model.parameters())
    return {"source": loaded.source, "name": cfg.name, "kind": cfg.kind, "backbone": vars(cfg.backbone),
            "conditions": list(cfg.conditions), "class_names": {k: list(v) for k, v in cfg.class_names.items()},
            "feature_dim": cfg.feature_dim, "grid_size": cfg.grid_size, "input_features": list(cfg.input_features),
            "parameters": params, "render": cfg.render or None}


def run_inspect(args) -> int:
    info = describe(args.checkpoint, args.trust_checkpoint)
    if args.json:
        print(json.dumps(info, indent=2, default=list))
        return 0
    bb = info["backbone"]
    print(f"checkpoint   {info['source']}")
    print(f"kind         {info['kind']}")
    print(f"backbone     {bb['type']}  in={bb['in_channels']} base={bb['base_channels']} "
          f"channels={list(bb['channels'])} layers={list(bb['layers'])}"
          + (f" classes={bb['num_classes']}" if bb["num_classes"] else ""))
    if bb["type"] == "SpUNet-v1m3":
        print(f"pdnorm       context={bb['context_channels']} banks={list(bb['conditions'])}")
    print(f"conditions   {info['conditions'] or '-'}")
    for cond, names in info["class_names"].items():
        print(f"classes[{cond}] ({len(names)}): {', '.join(names)}")
    print(f"features     {info['feature_dim']} channels, grid {info['grid_size']} m, input {info['input_features']}")
    if info["render"]:
        print(f"render       {info['render']}")
    print(f"parameters   {info['parameters']:,}")
    return 0


def run_convert(args) -> int:
    from model.checkpoint import load_checkpoint, save_checkpoint

    loaded = load_checkpoint(args.checkpoint, trust=args.trust_checkpoint)
    loaded.config.name = args.name or Path(args.checkpoint).stem
    out = save_checkpoint(loaded.model, loaded.config, args.output)
    print(f"wrote {out} ({loaded.config.kind}, {sum(p.numel() for p in loaded.model.parameters()):,} parameters)",
          file=sys.stderr)
    return 0

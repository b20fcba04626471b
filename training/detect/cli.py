"""3D object detection: fine-tune an encoder with a voting box head, evaluate it, and run it (``ponder detect``).

    ponder train detect --config CFG [--init CKPT] [--out DIR] [--label-fraction F] [--resume] [--device D]
    ponder evaluate detect --data DIR --checkpoint CKPT [--split val] [--json FILE]
    ponder detect INPUT -o BOXES.json [--checkpoint CKPT] [--score 0.3] [--iou 0.25] [--condition C]

``ponder detect`` writes JSON (``format: ponder-detections/1``)::

    {"format": "ponder-detections/1", "source": "room.ply", "box_convention": "...",
     "class_names": [...],
     "detections": [{"label": "chair", "label_id": 2, "score": 0.91,
                     "center": [cx, cy, cz], "size": [dx, dy, dz], "yaw": 0.12,
                     "corners": [[x, y, z] x 8]}, ...]}

Box convention (model/detection/boxes.py): ``center`` is the box centre in the input cloud's frame and units
(metres); ``size`` the full edge lengths along the box's own x, y, z axes; ``yaw`` the rotation of the box's x
axis about +z in radians, counter-clockwise seen from above (x axis along (cos yaw, sin yaw, 0)); ``corners``
the bottom face then the top face, each counter-clockwise from above. Detections are sorted by score.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ train


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, required=True, help="detection YAML (training/configs/detect-*.yaml)")
    parser.add_argument("--init", default=None,
                        help="checkpoint whose encoder starts the run (ours, an official .pth, or a pre-training "
                             "checkpoint); default: the config's model.init")
    parser.add_argument("--out", type=Path, default=None, help="run folder (default: the config's out_dir)")
    parser.add_argument("--label-fraction", type=float, default=None,
                        help="train on this share of the training scenes (0 < F <= 1; data-efficient runs)")
    parser.add_argument("--data", default=None, help="data root (default: the config's data.root)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: the config's train.device")


def ensure_data(cfg) -> None:
    """Generate the synthetic scenes a config asks for when its data folder does not exist yet."""
    from training.data.synthetic import SceneConfig, generate_dataset

    root, gen = Path(cfg.data.root), cfg.data.generate
    if gen is None or root.exists():
        return
    log.info("generating %d synthetic scenes into %s", gen.scenes, root)
    splits = [(cfg.data.train_split, 1.0 - gen.val_fraction)]
    if cfg.data.val_split and gen.val_fraction > 0:
        splits.append((cfg.data.val_split, gen.val_fraction))
    generate_dataset(root, gen.scenes, gen.seed, SceneConfig(num_frames=0, points_per_m2=gen.points_per_m2),
                     splits=tuple(splits), progress=False)


def run_train(args: argparse.Namespace) -> int:
    import yaml

    from model.checkpoint import save_checkpoint
    from training.detect.config import load_config
    from training.detect.task import DetectorTrainer, DetectTask, build_detector
    from training.engine import Trainer

    cfg = load_config(args.config)
    if args.label_fraction is not None:
        if not 0 < args.label_fraction <= 1:
            raise ValueError(f"--label-fraction must lie in (0, 1], got {args.label_fraction}")
        cfg.data.label_fraction = args.label_fraction
    if args.data:
        cfg.data.root = args.data
    if args.init:
        cfg.model.init = args.init
    if args.device:
        cfg.train.device = args.device
    _check_device(cfg.train.device)
    out = Path(args.out or cfg.out_dir)
    last = out / "model" / "model_last.pth"
    if last.exists() and not args.resume:
        raise ValueError(f"{out} already holds a run ({last}); pass --resume to continue it or choose another --out")
    ensure_data(cfg)
    model, model_cfg = build_detector(cfg)
    task = DetectTask(cfg, model_cfg)
    condition = cfg.model.condition or model_cfg.default_condition()
    trainer_model = DetectorTrainer(model, cfg.loss, condition, cfg.model.freeze_backbone)
    out.mkdir(parents=True, exist_ok=True)
    effective = json.loads(json.dumps(dataclasses.asdict(cfg)))  # after --init/--data/--label-fraction
    (out / "config.yaml").write_text(yaml.safe_dump(effective, sort_keys=False))
    trainer = Trainer(trainer_model, task, cfg.train, out, save_fn=lambda m, d: save_checkpoint(m, model_cfg, d))
    history = trainer.fit(resume=args.resume)
    if history:
        first, final = history[0], history[-1]
        print(f"trained {trainer.step} steps on {task.num_samples()} scenes: loss {first['loss']:.4f} -> "
              f"{final['loss']:.4f}")
    print(f"checkpoint: {out / 'final'} (official container: {last})")
    if cfg.eval.after_train and cfg.data.val_split and int(os.environ.get("RANK", 0)) == 0:
        from training.detect.dataset import find_scene_dirs

        try:
            val_dirs = find_scene_dirs(cfg.data.root, cfg.data.val_split)
        except FileNotFoundError as exc:
            log.warning("no validation scenes (%s); skipping the evaluation", exc)
            return 0
        metrics = _evaluate(out / "final", val_dirs, condition, cfg.eval, cfg.train.device)
        print(f"validation ({cfg.data.val_split}, {len(val_dirs)} scenes):\n{metrics.table()}")
        (out / "metrics.json").write_text(json.dumps(metrics.summary(), indent=2))
    return 0


def _evaluate(checkpoint: Path, scene_dirs, condition, eval_cfg, device: str, trust: bool = False):
    from model.inference import load_predictor
    from training.detect.evaluate import evaluate_detector

    predictor = load_predictor(checkpoint, device=device, trust_checkpoint=trust)
    return evaluate_detector(predictor, scene_dirs, condition, eval_cfg.score_threshold, eval_cfg.iou_thresholds,
                             eval_cfg.report_score)


# ------------------------------------------------------------------------------------------ evaluate


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, required=True,
                        help="data root with <split>/ scene folders, a folder of scenes, or one scene folder "
                             "(each with boxes.npy and box_labels.npy)")
    parser.add_argument("--checkpoint", type=Path, required=True, help="detection checkpoint (folder)")
    parser.add_argument("--split", default="val", help="split under --data (default val)")
    parser.add_argument("--score", type=float, default=0.05,
                        help="lowest score kept for AP (default 0.05: AP sees nearly the whole ranking)")
    parser.add_argument("--report-score", type=float, default=0.3,
                        help="recall is also reported for boxes scoring at least this (default 0.3)")
    parser.add_argument("--iou", type=float, nargs="+", default=[0.25, 0.5], help="IoU thresholds (default 0.25 0.5)")
    parser.add_argument("--condition", default=None, help="dataset condition of PDNorm/PPT encoders")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--json", type=Path, default=None, help="also write the metrics to this JSON file")
    parser.add_argument("--trust-checkpoint", action="store_true", help="allow full unpickling of an official .pth")


def run_evaluate(args: argparse.Namespace) -> int:
    from training.detect.config import EvalConfig
    from training.detect.dataset import find_scene_dirs

    for value in (args.score, args.report_score, *args.iou):
        if not 0 <= value <= 1:
            raise ValueError(f"scores and IoU thresholds must lie in [0, 1], got {value}")
    _check_device(args.device)
    if not args.checkpoint.exists():
        raise FileNotFoundError(f"{args.checkpoint}: no such checkpoint")
    dirs = find_scene_dirs(args.data, args.split)
    eval_cfg = EvalConfig(score_threshold=args.score, report_score=args.report_score, iou_thresholds=tuple(args.iou))
    metrics = _evaluate(args.checkpoint, dirs, args.condition, eval_cfg, args.device, args.trust_checkpoint)
    print(f"{len(dirs)} scenes from {args.data}")
    print(metrics.table())
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(metrics.summary(), indent=2))
    return 0


# ------------------------------------------------------------------------------------------ detect


def add_run_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("detect", help="3D object boxes of a point cloud (JSON)")
    p.add_argument("input", type=Path, help="point cloud: .ply .las .laz .npy .npz .pcd .xyz .txt .bin")
    p.add_argument("-o", "--output", type=Path, required=True, help="output JSON (format ponder-detections/1)")
    p.add_argument("--checkpoint", "-c", default=None, help="detection checkpoint (default: the bundled model)")
    p.add_argument("--score", type=float, default=None, help="lowest score kept (default: the model's, 0.3)")
    p.add_argument("--iou", type=float, default=None, help="per-class NMS IoU threshold (default: the model's, 0.25)")
    p.add_argument("--condition", default=None, help="dataset condition of PDNorm/PPT encoders")
    p.add_argument("--format", dest="input_format", default=None, help="input format when the suffix does not tell")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--trust-checkpoint", action="store_true", help="allow full unpickling of an official .pth")
    p.add_argument("--ply", type=Path, default=None,
                   help="also write the boxes as wireframes (12 PLY edges per box, coloured by class) for "
                        "MeshLab / CloudCompare")
    p.set_defaults(handler=run_detect)


def run_detect(args: argparse.Namespace) -> int:
    from model.detection.predict import detect
    from model.pointcloud.readers import read_point_cloud

    for name, value in (("--score", args.score), ("--iou", args.iou)):
        if value is not None and not 0 <= value <= 1:
            raise ValueError(f"{name} must lie in [0, 1], got {value}")
    _check_device(args.device)
    if args.output.is_dir():
        raise IsADirectoryError(f"{args.output}: is a folder; -o takes a .json file path")
    if args.ply is not None and args.ply.is_dir():
        raise IsADirectoryError(f"{args.ply}: is a folder; --ply takes a .ply file path")
    cloud = read_point_cloud(args.input, format=args.input_format)     # bad input fails before the model loads
    from model.inference import default_checkpoint, load_predictor

    checkpoint = args.checkpoint or default_checkpoint("detect")
    predictor = load_predictor(checkpoint, device=args.device, trust_checkpoint=args.trust_checkpoint)
    result = detect(predictor, cloud, args.condition, score_threshold=args.score, iou_threshold=args.iou)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.output.with_name(args.output.name + ".partial")
    tmp.write_text(result.dumps(source=str(args.input)))
    tmp.replace(args.output)
    if args.ply is not None:
        from model.detection import box_corners
        from model.pointcloud.palette import write_box_wireframes

        write_box_wireframes(args.ply, box_corners(result.boxes) if len(result) else [], result.labels,
                             result.class_names)
    counts: dict[str, int] = {}
    for label in result.labels:
        counts[result.class_names[int(label)]] = counts.get(result.class_names[int(label)], 0) + 1
    summary = ", ".join(f"{n} {name}" for name, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    print(f"wrote {args.output}: {len(result)} boxes from {len(cloud):,} points" + (f" ({summary})" if summary else ""))
    return 0


def _check_device(name: str) -> None:
    if name == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but no CUDA GPU is available")

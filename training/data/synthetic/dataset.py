"""`generate_dataset` and the ``ponder datasets generate`` command.

Output tree (the real layouts; see writer.py):
    <out>/<split>/<scene_id>/*.npy      Pointcept point scenes
    <out>/rgbd/<scene_id>/...           ScanNet RGB-D export
    <out>/<split>.txt                   scene ids per split
    <out>/synthetic.json                seed, config and class names, for reproducibility
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..classes import DETECTION_NAMES, SCANNET20_NAMES
from .rooms import RoomType
from .scene import SceneConfig, generate_scene
from .writer import write_point_scene, write_rgbd_scene


def scene_seed(seed: int, index: int) -> int:
    """Seed of scene `index`: independent of how many scenes are generated."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def split_counts(num_scenes: int, fractions: Sequence[float]) -> list[int]:
    """Scenes per split by cumulative rounding (sums to num_scenes)."""
    if num_scenes < 0 or any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise ValueError(
            "need num_scenes >= 0 and non-negative split fractions with a positive sum, "
            f"got {num_scenes}, {list(fractions)}"
        )
    edges = np.rint(np.cumsum([0.0, *fractions]) / sum(fractions) * num_scenes).astype(int)
    return list(np.diff(edges))


def generate_dataset(
    out_dir: str | Path,
    num_scenes: int,
    seed: int = 0,
    config: SceneConfig | None = None,
    splits: Sequence[tuple[str, float]] = (("train", 0.8), ("val", 0.2)),
    progress: bool = True,
) -> dict[str, list[str]]:
    """Generate num_scenes rooms and write both layouts; returns {split: [scene ids]}.

    Scenes are named scene%04d_00 in generation order and assigned to splits in that order.
    """
    config = config or SceneConfig()
    out = Path(out_dir)
    counts = split_counts(num_scenes, [f for _, f in splits])
    assignment = [name for (name, _), n in zip(splits, counts, strict=True) for _ in range(n)]
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, list[str]] = {name: [] for name, _ in splits}
    for index in tqdm(range(num_scenes), desc="synthetic scenes", unit="scene", disable=not progress):
        scene_id = f"scene{index:04d}_00"
        scene = generate_scene(scene_seed(seed, index), config)
        write_point_scene(out / assignment[index] / scene_id, scene)
        if scene.frames is not None:
            write_rgbd_scene(out / "rgbd" / scene_id, scene_id, scene.frames)
        result[assignment[index]].append(scene_id)
    for name, ids in result.items():
        (out / f"{name}.txt").write_text("".join(f"{i}\n" for i in ids))
    meta = {
        "seed": seed,
        "num_scenes": num_scenes,
        "splits": result,
        "config": {k: ([t.name for t in v] if k == "room_types" else v) for k, v in dataclasses.asdict(config).items()},
        "segment_names": list(SCANNET20_NAMES),
        "detection_names": list(DETECTION_NAMES),
    }
    (out / "synthetic.json").write_text(json.dumps(meta, indent=2))
    return result


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``ponder datasets generate``."""
    d = SceneConfig()
    parser.add_argument("--out", type=Path, required=True, help="output folder (created)")
    parser.add_argument("--scenes", type=int, default=8, help="number of rooms (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="share of rooms in the val split (default 0.2)")
    parser.add_argument(
        "--frames", type=int, default=d.num_frames, help=f"RGB-D frames per room, 0 for none (default {d.num_frames})"
    )
    parser.add_argument(
        "--image-downscale",
        type=int,
        default=d.image_downscale,
        help=f"frames are 640x480 divided by this (default {d.image_downscale}: 160x120)",
    )
    parser.add_argument(
        "--points-per-m2", type=float, default=d.points_per_m2, help=f"point density (default {d.points_per_m2:g})"
    )
    parser.add_argument(
        "--ceiling", action="store_true", help="close the rooms with a ceiling (off by default, as in ScanNet scans)"
    )
    parser.add_argument(
        "--room-types",
        nargs="+",
        choices=[t.name.lower() for t in RoomType],
        default=None,
        help="restrict the room types (default: all)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run_generate(args: argparse.Namespace) -> int:
    """Run ``ponder datasets generate``; returns the process exit code."""
    try:
        if args.scenes < 1:
            raise ValueError(f"--scenes must be at least 1, got {args.scenes}")
        if not 0.0 <= args.val_fraction < 1.0:
            raise ValueError(f"--val-fraction must lie in [0, 1), got {args.val_fraction}")
        types = tuple(RoomType[t.upper()] for t in args.room_types) if args.room_types else tuple(RoomType)
        config = SceneConfig(
            room_types=types,
            ceiling=args.ceiling,
            points_per_m2=args.points_per_m2,
            num_frames=args.frames,
            image_downscale=args.image_downscale,
        )
        splits = (("train", 1.0 - args.val_fraction), ("val", args.val_fraction))
        result = generate_dataset(args.out, args.scenes, args.seed, config, splits, progress=not args.quiet)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(
        f"wrote {sum(len(v) for v in result.values())} scenes to {args.out} ("
        + ", ".join(f"{k}: {len(v)}" for k, v in result.items())
        + ")"
    )
    return 0

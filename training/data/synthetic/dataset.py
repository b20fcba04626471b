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
import logging
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..classes import DETECTION_NAMES, SCANNET20_NAMES
from .rooms import RoomType
from .scene import SceneConfig, check_density, generate_scene
from .writer import write_point_scene, write_rgbd_scene

log = logging.getLogger(__name__)
MARKER = "synthetic.json"  # written last: a dataset folder without it is not complete
_SCENE_ID = re.compile(r"scene\d{4}_00")


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
    overwrite: bool = False,
) -> dict[str, list[str]]:
    """Generate num_scenes rooms and write both layouts; returns {split: [scene ids]}.

    Scenes are named scene%04d_00 in generation order and assigned to splits in that order. The dataset is built
    in the sibling folder ``<out>.partial`` and renamed to ``out`` only when complete, so an interrupted run never
    leaves a dataset that looks usable (the next run replaces the leftover ``.partial``). An existing non-empty
    ``out`` is refused unless ``overwrite``, and then replaced whole only if it holds a generated dataset.
    """
    config = config or SceneConfig()
    out = Path(out_dir)
    counts = split_counts(num_scenes, [f for _, f in splits])
    assignment = [name for (name, _), n in zip(splits, counts, strict=True) for _ in range(n)]
    _check_target(out, overwrite)
    work = _fresh_partial(out)
    try:
        result = _write_dataset(work, num_scenes, seed, config, splits, assignment, progress)
        _move_into_place(work, out)
    except BaseException:  # Ctrl-C included: never leave a half-written dataset behind
        shutil.rmtree(work, ignore_errors=True)
        raise
    return result


def _partial_path(out: Path) -> Path:
    """The temporary sibling a dataset is built in (same file system, so the final rename is atomic)."""
    absolute = Path(os.path.abspath(out))  # lexically: a symlinked --out keeps its own parent
    if not absolute.name:
        raise ValueError(f"{out}: cannot generate a dataset into the root folder")
    return absolute.with_name(absolute.name + ".partial")


def _split_names(folder: Path) -> set[str] | None:
    """The split names recorded in the folder's synthetic.json; None when it has none or it is unreadable."""
    try:
        splits = json.loads((folder / MARKER).read_text())["splits"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return {str(name) for name in splits} if isinstance(splits, dict) else None


def _looks_generated(folder: Path, splits: set[str] | None) -> bool:
    """True when every entry is one ``generate_dataset`` writes: synthetic.json, ``<split>.txt`` lists, and rgbd/
    and split folders holding only sceneXXXX_00 folders (``splits``: the known split names; None for a partial
    folder, whose lists must then sit beside their split folder). Deleting anything else would lose the user's
    files, so ``--overwrite`` and the cleanup of ``.partial`` refuse it."""
    for entry in folder.iterdir():
        if entry.is_symlink():
            return False
        if entry.is_file():
            known = splits if splits is not None else {e.name for e in folder.iterdir() if e.is_dir()}
            if entry.name == MARKER or (entry.suffix == ".txt" and entry.stem in known):
                continue
            return False
        if not entry.is_dir() or (splits is not None and entry.name not in splits | {"rgbd"}):
            return False
        children = list(entry.iterdir())
        if not children or not all(_SCENE_ID.fullmatch(c.name) and c.is_dir() for c in children):
            return False
    return True


def _check_target(out: Path, overwrite: bool) -> None:
    """Refuse an output that is a file, or a non-empty folder without ``overwrite`` (mixing two datasets would
    leave stale scenes that evaluation still lists), or with ``overwrite`` a folder that is not a dataset."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out must be a folder, and {out} is a file")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        held = f"already holds a dataset ({MARKER})" if (out / MARKER).is_file() else "is not empty"
        raise ValueError(f"--out {out} {held}; choose another folder or pass --overwrite to replace it")
    splits = _split_names(out)
    if out.is_symlink() or splits is None or not _looks_generated(out, splits):
        raise ValueError(f"--out {out} holds files that are not a generated dataset; --overwrite only replaces "
                         "a folder written by ponder datasets generate")


def _fresh_partial(out: Path) -> Path:
    """An empty ``<out>.partial``, after removing what a killed generation left there."""
    work = _partial_path(out)
    if work.is_symlink() or (work.exists() and not work.is_dir()):
        raise ValueError(f"{work} is in the way of the temporary dataset folder; remove it")
    if work.exists():
        if not _looks_generated(work, _split_names(work)):
            raise ValueError(f"{work} is in the way of the temporary dataset folder and is not a partial dataset; "
                             "move it away")
        log.info("removing %s, left by an interrupted generation", work)
        shutil.rmtree(work)
    work.mkdir(parents=True)
    return work


def _move_into_place(work: Path, out: Path) -> None:
    """Rename the finished dataset onto ``out``; a non-empty ``out`` (overwrite) is moved aside first and then
    deleted, so ``out`` is never a mix of the two."""
    if out.is_dir() and any(out.iterdir()):
        old = Path(tempfile.mkdtemp(prefix=f".{work.stem}.replaced-", dir=work.parent))  # empty: renamed onto
        os.replace(out, old)
        os.replace(work, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(work, out)  # onto a missing or empty folder


def _write_dataset(
    out: Path,
    num_scenes: int,
    seed: int,
    config: SceneConfig,
    splits: Sequence[tuple[str, float]],
    assignment: list[str],
    progress: bool,
) -> dict[str, list[str]]:
    """Write the scenes, split lists and finally the completion marker into ``out``."""
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
    (out / MARKER).write_text(json.dumps(meta, indent=2))
    return result


def needs_generation(root: str | Path, scenes: int) -> bool:
    """Whether the automatic generation of a training config (``data.generate``) must write ``root``.

    False for a complete generated dataset of at least ``scenes`` scenes, and for a folder that is not a generated
    dataset at all (the user's own data, e.g. ScanNet given with ``--data``). Raises ValueError for what training
    must not silently use: an interrupted generation (scene folders but no synthetic.json) or a complete one with
    fewer scenes than the config asks for.
    """
    root = Path(root)
    if not root.exists() or (root.is_dir() and not any(root.iterdir())):
        return True
    if not root.is_dir():
        raise ValueError(f"data.root {root} is a file, not a data folder")
    marker = root / MARKER
    if not marker.is_file():
        if next(root.glob("*/scene*_00/box_instances.npy"), None) is not None:  # only the generator writes these
            raise ValueError(f"data.root {root} holds an incomplete synthetic dataset (no {MARKER}: its generation "
                             "was interrupted); delete the folder to generate it again")
        return False
    try:
        have = int(json.loads(marker.read_text())["num_scenes"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{marker}: not a readable dataset description ({err}); delete {root} to generate it "
                         "again") from None
    if have < scenes:
        raise ValueError(f"data.root {root} holds {have} generated scenes but data.generate.scenes asks for "
                         f"{scenes}; delete the folder to generate {scenes}, or set data.generate.scenes to {have}")
    return False


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``ponder datasets generate``."""
    d = SceneConfig()
    parser.add_argument("--out", type=Path, required=True, help="output folder (created; must be empty or new)")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace the dataset in --out (whole, once the new one is complete)"
    )
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


def _generate_from_args(args: argparse.Namespace) -> dict[str, list[str]]:
    """Check the options (each error names its option), then generate."""
    if args.scenes < 1:
        raise ValueError(f"--scenes must be at least 1, got {args.scenes}")
    if not 0.0 <= args.val_fraction < 1.0:
        raise ValueError(f"--val-fraction must lie in [0, 1), got {args.val_fraction}")
    check_density(args.points_per_m2, "--points-per-m2")
    types = tuple(RoomType[t.upper()] for t in args.room_types) if args.room_types else tuple(RoomType)
    config = SceneConfig(
        room_types=types,
        ceiling=args.ceiling,
        points_per_m2=args.points_per_m2,
        num_frames=args.frames,
        image_downscale=args.image_downscale,
    )
    splits = (("train", 1.0 - args.val_fraction), ("val", args.val_fraction))
    return generate_dataset(args.out, args.scenes, args.seed, config, splits, not args.quiet, args.overwrite)


def run_generate(args: argparse.Namespace) -> int:
    """Run ``ponder datasets generate``; returns the process exit code (2 with ``ponder datasets: error: ...``,
    the form of every other command, for bad options or an unwritable --out)."""
    try:
        result = _generate_from_args(args)
    except (ValueError, OSError) as err:  # a full disk, a read-only folder: one line, not a traceback
        print(f"ponder datasets: error: {err}", file=sys.stderr)
        return 2
    print(
        f"wrote {sum(len(v) for v in result.values())} scenes to {args.out} ("
        + ", ".join(f"{k}: {len(v)}" for k, v in result.items())
        + ")"
    )
    return 0

"""Readers for the on-disk layouts training uses; the same code reads synthetic and real ScanNet data.

* Point scenes: a Pointcept folder ``<scene>/{coord,color,normal,segment20,instance}.npy`` (plus
  optional ``boxes.npy``, ``box_labels.npy``, ``box_instances.npy``), or a PonderV2 ``.pth`` dict
  (spec §7.1), loaded with ``torch.load(weights_only=True)`` and only numpy arrays allow-listed.
* ScanNet RGB-D export (spec §7.2): ``<scene>/{color,depth,pose,label}/<i>.*`` and ``intrinsic/``.
  Frames are returned the way ``ScanNetRGBDDataset`` hands them to the pipeline: colour resized to
  the depth size, depth in millimetres, depth intrinsics, WORLD-TO-CAMERA extrinsics, labels mapped
  NYU40 -> ScanNet-20.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .classes import nyu40_to_scannet20

DEPTH_SCALE = 1.0 / 1000.0  # ScanNet depth PNGs are millimetres

# Pointcept file stem -> key in the returned dict. segment20 wins over segment when both exist.
_NPY_KEYS = {
    "coord": "coord",
    "color": "color",
    "normal": "normal",
    "segment": "segment",
    "segment20": "segment",
    "instance": "instance",
    "boxes": "boxes",
    "box_labels": "box_labels",
    "box_instances": "box_instances",
}
# PonderV2 .pth key -> returned key (ScanNet, S3DIS and Structured3D preprocessing).
_PTH_KEYS = {
    "coord": "coord",
    "color": "color",
    "normal": "normal",
    "semantic_gt20": "segment",
    "semantic_gt": "segment",
    "instance_gt": "instance",
}
_LABEL_KEYS = ("segment", "instance", "box_labels", "box_instances")


def _integer_labels(array: np.ndarray, where: str) -> np.ndarray:
    """Label ids as stored when they are whole numbers: a float array of values like 3.5 is a wrong file (casting
    would silently truncate it to another class), so it is refused with ``where`` (the file, and key) named."""
    if array.dtype.kind == "f":
        bad = ~np.isfinite(array) | (array != np.rint(array))
        if bad.any():
            raise ValueError(f"{where}: labels must be whole numbers, found {float(array[bad].flat[0])} "
                             f"({int(bad.sum())} of {array.size} values, dtype {array.dtype})")
    elif array.dtype.kind not in "iub":
        raise ValueError(f"{where}: labels must be integers, got dtype {array.dtype}")
    return array


def load_scene(path: str | Path) -> dict[str, np.ndarray]:
    """A point scene as numpy arrays: coord (N,3), color (N,3), normal (N,3) when present,
    segment (N,) int64 and instance (N,) int64 (filled with -1 when the scene has no labels, as for
    a test split), and boxes / box_labels / box_instances when present. Dtypes of coord, color and
    normal are kept as stored."""
    path = Path(path)
    if path.is_dir():
        out = _load_npy_scene(path)
    elif path.suffix == ".pth" and path.is_file():
        out = _load_pth_scene(path)
    elif not path.exists():
        raise FileNotFoundError(f"{path}: no such scene folder or .pth file")
    else:
        raise ValueError(f"{path}: expected a Pointcept scene folder of .npy files or a PonderV2 .pth file")
    if "coord" not in out:
        raise ValueError(f"{path}: the scene has no coord array")
    n = len(out["coord"])
    if out["coord"].ndim != 2 or out["coord"].shape[1] != 3:
        raise ValueError(f"{path}: coord must be (N, 3), got {out['coord'].shape}")
    for key in ("segment", "instance"):
        out[key] = out[key].reshape(-1).astype(np.int64) if key in out else np.full(n, -1, dtype=np.int64)
    for key in ("color", "normal", "segment", "instance"):
        if key in out and len(out[key]) != n:
            raise ValueError(f"{path}: {key} has {len(out[key])} rows for {n} points")
    return out


def _load_npy_scene(folder: Path) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for stem in (
        "coord",
        "color",
        "normal",
        "segment",
        "segment20",
        "instance",
        "boxes",
        "box_labels",
        "box_instances",
    ):
        file = folder / f"{stem}.npy"
        if file.is_file():
            try:
                out[_NPY_KEYS[stem]] = np.load(file, allow_pickle=False)
            except ValueError as err:  # object arrays need pickle: refuse
                raise ValueError(f"{file}: not a plain numeric .npy array ({err})") from None
            if _NPY_KEYS[stem] in _LABEL_KEYS:
                _integer_labels(out[_NPY_KEYS[stem]], str(file))
    if not out:
        raise FileNotFoundError(f"{folder}: no Pointcept .npy files (coord.npy, color.npy, ...) in this folder")
    for key in ("box_labels", "box_instances"):
        if key in out:
            out[key] = out[key].astype(np.int64)
    return out


def _numpy_safe_globals() -> list:
    """The globals a pickled numpy array refers to, under both numpy 1 and numpy 2 names
    (``_reconstruct`` only allocates an empty array of an allow-listed type), plus the dtype
    classes of plain numeric arrays."""
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:
        from numpy.core.multiarray import _reconstruct
    names = ("numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct")
    plain = (
        np.bool_,
        np.int8,
        np.int16,
        np.int32,
        np.int64,
        np.uint8,
        np.uint16,
        np.uint32,
        np.uint64,
        np.float16,
        np.float32,
        np.float64,
        np.str_,
    )  # never object arrays
    return [(_reconstruct, name) for name in names] + [np.ndarray, np.dtype] + [type(np.dtype(t)) for t in plain]


def _load_pth_scene(file: Path) -> dict[str, np.ndarray]:
    import torch

    allowed = _numpy_safe_globals()
    try:
        with torch.serialization.safe_globals(allowed):
            raw = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling refusal becomes one clear message
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        reason = next((ln for ln in lines if _refused_global(ln)), None)
        if reason is None:  # a truncated zip, random bytes, an empty file: damage, not a foreign object
            detail = _damage_detail(lines)
            raise ValueError(
                f"{file}: not a readable PonderV2 .pth scene: the file is truncated or corrupt "
                f"({type(err).__name__}{': ' + detail if detail else ''})"
            ) from None
        raise ValueError(
            f"{file}: cannot be loaded safely with torch.load(weights_only=True) ({type(err).__name__}: {reason}). "
            "It holds objects other than tensors and plain numpy arrays; "
            "convert it once, in an environment you trust, to a Pointcept folder of .npy files "
            "(coord.npy, color.npy, normal.npy, segment20.npy, instance.npy) and point the reader at that folder."
        ) from None
    if not isinstance(raw, dict):
        raise ValueError(f"{file}: expected a dict of arrays, got {type(raw).__name__}")
    out: dict[str, np.ndarray] = {}
    for key, target in _PTH_KEYS.items():
        if key in raw and target not in out:
            value = raw[key]
            array = value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
            if array.dtype == object:
                raise ValueError(f"{file}: key {key!r} is an object array, not numbers")
            out[target] = _integer_labels(array, f"{file} [{key!r}]") if target in _LABEL_KEYS else array
    return out


def _damage_detail(lines: list[str]) -> str:
    """The informative part of torch's (multi-line, advice-laden) load error: what the weights-only unpickler
    choked on, else the first sentence."""
    for index, line in enumerate(lines):
        at = line.lower().find("unpickler error:")
        if at >= 0:
            rest = line[at + len("unpickler error:"):].strip()
            return (rest or (lines[index + 1] if index + 1 < len(lines) else ""))[:200]
    return (lines[0].split(". ")[0] if lines else "")[:200]


def _refused_global(line: str) -> bool:
    """Whether a torch.load(weights_only=True) error line says a pickled global was refused (the file holds
    foreign objects), as opposed to a damaged file (zip or pickle errors)."""
    text = line.lower()
    return "global" in text or "can only build" in text


@dataclass(frozen=True)
class FrameSelection:
    """Which exported frames a scene contributes (spec §7.2): sort numerically, keep every
    ``pre_step``-th (10 for ScanNet val/test), then ``frames[start:stop:step]``. The ScanNet values
    come from nearby_num=2, nearby_interval=20, frame_interval=10."""

    start: int = 40
    stop: int | None = -60
    step: int = 10
    pre_step: int = 1


SCANNET_TRAIN_FRAMES = FrameSelection()
SCANNET_EVAL_FRAMES = FrameSelection(pre_step=10)
ALL_FRAMES = FrameSelection(start=0, stop=None, step=1)  # short synthetic trajectories


def list_frames(
    scene_dir: str | Path, selection: FrameSelection = SCANNET_TRAIN_FRAMES, skip: Sequence[int] = ()
) -> list[int]:
    """Frame ids of a ScanNet RGB-D scene folder (from ``color/<i>.jpg``) after the selection rule;
    frames listed in skip (ScanNet's ``skip.lst`` entries for this scene) are dropped."""
    color = Path(scene_dir) / "color"
    if not color.is_dir():
        raise FileNotFoundError(f"{scene_dir}: no color/ folder; expected the ScanNet RGB-D export layout")
    ids = sorted(int(p.stem) for p in color.glob("*.jpg") if p.stem.isdigit())
    ids = ids[:: selection.pre_step][selection.start : selection.stop : selection.step]
    banned = set(skip)
    return [i for i in ids if i not in banned]


def read_skip_list(path: str | Path) -> dict[str, set[int]]:
    """ScanNet's skip.lst ("sceneXXXX_XX frame" per line) as {scene: {frames}}."""
    out: dict[str, set[int]] = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            raise ValueError(f"{path}:{number}: expected 'sceneXXXX_XX frame', got {line!r}")
        out.setdefault(parts[0], set()).add(int(parts[1]))
    return out


def read_split(root: str | Path, split: str) -> list[str]:
    """Scene ids listed in ``<root>/<split>.txt``, one per line."""
    file = Path(root) / f"{split}.txt"
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no split list for {split!r}")
    return [line.strip() for line in file.read_text().splitlines() if line.strip()]


def _matrix(path: Path) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing")
    try:
        m = np.loadtxt(path, dtype=np.float64)
    except ValueError as err:  # numpy's text names the row and column but not the file
        raise ValueError(f"{path}: not a 4x4 matrix of numbers ({err})") from None
    if m.shape != (4, 4):
        raise ValueError(f"{path}: expected a 4x4 matrix, got shape {m.shape}")
    return m


def _axis_alignment(scene_dir: Path) -> np.ndarray:
    for meta in scene_dir.glob("*.txt"):
        match = re.search(r"^axisAlignment\s*=\s*(.+)$", meta.read_text(), flags=re.MULTILINE)
        if match:
            values = np.array(match.group(1).split(), dtype=np.float64)
            if values.size != 16:
                raise ValueError(f"{meta}: axisAlignment needs 16 numbers, got {values.size}")
            return values.reshape(4, 4)
    return np.eye(4)  # ScanNet test scenes have no alignment either


def _image(path: Path) -> Image.Image:
    """The decoded image; a corrupt or truncated file is a ValueError naming it (Pillow raises OSError
    subclasses, which the CLI would show as a traceback)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing")
    try:
        image = Image.open(path)
        image.load()  # decodes now (and closes the file), so damage shows here, naming the file
        return image
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(f"{path}: not a readable image ({err})") from None


def load_rgbd_frames(
    scene_dir: str | Path, frame_ids: Sequence[int], align_axis: bool = False
) -> dict[str, np.ndarray]:
    """Views of one scene, stacked along the first axis V = len(frame_ids):

    rgb (V,H,W,3) uint8 (bilinear-resized to the depth size when it differs), depth (V,H,W)
    float32 millimetres (0 = no measurement), intrinsic (V,4,4) float64 depth intrinsics (the
    official dataset appends one per view), extrinsic (V,4,4) float64 world-to-camera (the
    inverted pose, after ``axisAlignment @ pose`` when align_axis), semantic (V,H,W) int16
    ScanNet-20 index or -1 (all -1 without label/), instance (V,H,W) int64 (-1 none; only when an
    instance/ folder exists), depth_scale (float, 1/1000).
    """
    scene_dir = Path(scene_dir)
    if not frame_ids:
        raise ValueError(f"{scene_dir}: no frames requested")
    intrinsic = _matrix(scene_dir / "intrinsic" / "intrinsic_depth.txt")
    align = _axis_alignment(scene_dir) if align_axis else np.eye(4)
    rgb, depth, extrinsic, semantic, instance = [], [], [], [], []
    has_instance = (scene_dir / "instance").is_dir()
    for i in frame_ids:
        d = np.asarray(_image(scene_dir / "depth" / f"{i}.png"))
        if d.ndim != 2 or d.dtype not in (np.uint16, np.int32):
            name = scene_dir / "depth" / f"{i}.png"
            raise ValueError(f"{name}: expected a 16-bit single-channel depth PNG, got {d.dtype} {d.shape}")
        size = (d.shape[1], d.shape[0])
        if depth and depth[0].shape != d.shape:  # np.stack would fail without naming a file
            first = scene_dir / "depth" / f"{frame_ids[0]}.png"
            raise ValueError(f"{scene_dir / 'depth' / f'{i}.png'}: {size[0]}x{size[1]} pixels, but the first frame "
                             f"({first}) is {depth[0].shape[1]}x{depth[0].shape[0]}")
        color = _image(scene_dir / "color" / f"{i}.jpg").convert("RGB")
        if color.size != size:
            color = color.resize(size, Image.BILINEAR)
        pose = _matrix(scene_dir / "pose" / f"{i}.txt")
        if not np.isfinite(pose).all():
            raise ValueError(
                f"{scene_dir / 'pose' / f'{i}.txt'}: invalid (non-finite) pose; list this frame in the skip list"
            )
        label_file = scene_dir / "label" / f"{i}.png"
        if label_file.is_file():
            label = _image(label_file)
            if label.size != size:
                label = label.resize(size, Image.NEAREST)
            semantic.append(nyu40_to_scannet20(np.asarray(label)).astype(np.int16))
        else:
            semantic.append(np.full(d.shape, -1, dtype=np.int16))
        if has_instance:
            inst = _image(scene_dir / "instance" / f"{i}.png")
            instance.append(
                np.asarray(inst.resize(size, Image.NEAREST) if inst.size != size else inst).astype(np.int64) - 1
            )
        rgb.append(np.asarray(color, dtype=np.uint8))
        depth.append(d.astype(np.float32))
        extrinsic.append(np.linalg.inv(align @ pose))
    out = {
        "rgb": np.stack(rgb),
        "depth": np.stack(depth),
        "intrinsic": np.repeat(intrinsic[None], len(frame_ids), axis=0),
        "extrinsic": np.stack(extrinsic),
        "semantic": np.stack(semantic),
        "depth_scale": np.float64(DEPTH_SCALE),
    }
    if has_instance:
        out["instance"] = np.stack(instance)
    return out

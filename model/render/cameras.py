"""Pinhole cameras for novel-view rendering, parsed from JSON.

Conventions (those of the original training code):
* camera axes as OpenCV: +x right, +y down, +z forward (the viewing direction);
* ``world_to_camera`` maps world points (the scene's metric frame) to camera coordinates, in metres;
* pixel (x, y) of the output image looks through the image point (x, y) with ``K`` — integer coordinates
  are pixel centres (OpenCV), so the principal point of a W×H image centred on the optical axis is
  ((W-1)/2, (H-1)/2).

JSON camera object (one of each alternative, never both):
    {"width": 640, "height": 480,
     "K": [[fx, 0, cx], [0, fy, cy], [0, 0, 1]]        | "fx": .., "fy": .., "cx": .., "cy": ..,
     "world_to_camera": 4x4 (last row 0 0 0 1)         | "camera_to_world": 4x4}

nerfstudio / instant-ngp ``transforms.json`` is read by ``cameras_from_transforms``; ``read_cameras`` reads a
cameras file of either kind; ``load_camera_json`` parses the bytes of a cameras document (file or upload part).

Numeric limits (checked when a camera is parsed or built, so absurd values are refused with a CameraError naming
the field instead of failing later inside the renderer's float32 maths): width and height 1 to ``MAX_SIDE``;
fx, fy in [``MIN_FOCAL``, ``MAX_FOCAL``] pixels; |cx|, |cy| at most ``MAX_PRINCIPAL`` pixels; every pose
translation (hence the camera centre) within ±``MAX_TRANSLATION`` metres; every number finite.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np


class CameraError(ValueError):
    """A camera description that is missing, ambiguous or not a valid pinhole camera."""


MAX_SIDE = 1 << 20  # pixels per image side; the pixel limits of the callers are far lower in practice
MIN_FOCAL, MAX_FOCAL = 1e-3, 1e7  # pixels: below, float32 ray maths breaks down (K is singular in float32)
MAX_PRINCIPAL = 1e7  # pixels, |cx| and |cy|
MAX_TRANSLATION = 1e8  # metres, |t| of a pose: UTM northings (< 1e7) and ECEF (~6.4e6) fit; 1e300 broke the renderer


@dataclass(frozen=True)
class Camera:
    K: np.ndarray  # (3, 3) float64 intrinsics
    w2c: np.ndarray  # (4, 4) float64 world-to-camera, rigid
    width: int
    height: int

    def __post_init__(self) -> None:
        K = np.asarray(self.K, dtype=np.float64)
        w2c = np.asarray(self.w2c, dtype=np.float64)
        object.__setattr__(self, "K", K)
        object.__setattr__(self, "w2c", w2c)
        if not (isinstance(self.width, (int, np.integer)) and isinstance(self.height, (int, np.integer))) \
                or not (1 <= self.width <= MAX_SIDE and 1 <= self.height <= MAX_SIDE):
            raise CameraError(f"width and height must be integers from 1 to {MAX_SIDE}, got {self.width!r} x "
                              f"{self.height!r}")
        if K.shape != (3, 3) or not np.all(np.isfinite(K)):
            raise CameraError(f"K must be a finite 3x3 matrix, got shape {K.shape}")
        check_intrinsics(K)
        if w2c.shape != (4, 4) or not np.all(np.isfinite(w2c)):
            raise CameraError(f"world_to_camera must be a finite 4x4 matrix, got shape {w2c.shape}")
        _check_rigid(w2c, "world_to_camera")

    @property
    def c2w(self) -> np.ndarray:
        return np.linalg.inv(self.w2c)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Camera":
        """Parse the JSON camera object described in the module docstring."""
        if not isinstance(data, Mapping):
            raise CameraError(f"a camera must be a JSON object, got {type(data).__name__}")
        width, height = _require_int(data, "width"), _require_int(data, "height")
        return cls(K=parse_intrinsics(data), w2c=parse_pose(data), width=width, height=height)

    def to_dict(self) -> dict[str, Any]:
        return {"width": int(self.width), "height": int(self.height), "K": self.K.tolist(),
                "world_to_camera": self.w2c.tolist()}


def cameras_from_json(data: Any) -> list[Camera]:
    """A single camera object, a list of them, or ``{"cameras": [...]}``."""
    if isinstance(data, Mapping) and "cameras" in data:
        data = data["cameras"]
    items = data if isinstance(data, Sequence) and not isinstance(data, (str, bytes)) else [data]
    if not items:
        raise CameraError("no cameras given")
    cams = []
    for i, item in enumerate(items):
        try:
            cams.append(Camera.from_dict(item))
        except CameraError as exc:
            raise CameraError(f"camera {i}: {exc}") from None
    return cams


def parse_intrinsics(data: Mapping[str, Any]) -> np.ndarray:
    """(3, 3) K from ``"K"`` or ``"fx", "fy", "cx", "cy"`` (exactly one form) of a JSON camera object; shared by
    render cameras and RGB-D upload cameras, so both speak one format."""
    has_k = "K" in data
    given = [k for k in ("fx", "fy", "cx", "cy") if k in data]
    if has_k and given:
        raise CameraError("give the intrinsics as either 'K' or 'fx', 'fy', 'cx', 'cy' (exactly one), not both")
    if has_k:
        K = _matrix(data["K"], (3, 3), "K")
    else:
        missing = [k for k in ("fx", "fy", "cx", "cy") if k not in data]
        if missing:
            raise CameraError(f"give the intrinsics as 'K' or 'fx', 'fy', 'cx', 'cy' (missing {', '.join(missing)})")
        fx, fy, cx, cy = (_require_float(data, k) for k in ("fx", "fy", "cx", "cy"))
        K = np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])
    check_intrinsics(K)
    return K


def check_intrinsics(K: np.ndarray) -> None:
    """The form of a finite (3, 3) K and the ranges of its numbers (module docstring): the one intrinsics check
    of every camera parser, so no route lets through a K the float32 renderer cannot invert."""
    if K[0, 0] <= 0 or K[1, 1] <= 0 or K[0, 1] != 0 or K[1, 0] != 0 or np.any(K[2] != (0, 0, 1)):
        raise CameraError("K must be [[fx, 0, cx], [0, fy, cy], [0, 0, 1]] with fx, fy > 0")
    for name, value, lo, hi in (("fx", K[0, 0], MIN_FOCAL, MAX_FOCAL), ("fy", K[1, 1], MIN_FOCAL, MAX_FOCAL),
                                ("cx", K[0, 2], -MAX_PRINCIPAL, MAX_PRINCIPAL),
                                ("cy", K[1, 2], -MAX_PRINCIPAL, MAX_PRINCIPAL)):
        if not lo <= value <= hi:
            raise CameraError(f"'{name}' must be within [{lo:g}, {hi:g}] pixels, got {value:g}")


def parse_pose(data: Mapping[str, Any], required: bool = True) -> np.ndarray:
    """(4, 4) rigid world-to-camera from ``"world_to_camera"`` or ``"camera_to_world"`` (exactly one form); with
    ``required=False`` a camera that gives neither sits at the world origin (identity)."""
    has_w2c, has_c2w = "world_to_camera" in data, "camera_to_world" in data
    if has_w2c and has_c2w:
        raise CameraError("give the pose as either 'world_to_camera' or 'camera_to_world' (exactly one), not both")
    if not (has_w2c or has_c2w):
        if required:
            raise CameraError("give the pose as 'world_to_camera' or 'camera_to_world'")
        return np.eye(4)
    name = "world_to_camera" if has_w2c else "camera_to_world"
    pose = _matrix(data[name], (4, 4), name)
    _check_rigid(pose, name)
    return pose if has_w2c else np.linalg.inv(pose)


def load_camera_json(data: str | bytes, what: str = "the cameras document") -> Any:
    """Parsed JSON of a cameras document (a file or an upload part): the one JSON reader of every camera parser.
    Any failure of the decoder is the input's fault and a CameraError naming ``what``: invalid JSON or UTF-8,
    an integer of more digits than Python converts (a plain ValueError), nesting deeper than the recursion
    limit (RecursionError)."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise CameraError(f"{what}: not valid JSON ({reason})") from None


def read_camera_document(path: str | os.PathLike) -> Any:
    """The parsed JSON of a cameras file (what ``cameras_from_document`` and ``camera_image_names`` take):
    the one reader of camera files for ``ponder render`` and the image branch. FileNotFoundError when the file
    is absent, IsADirectoryError for a folder, CameraError naming it when it is not JSON."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a folder, not a cameras file (give the cameras JSON file)")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such cameras file")
    return load_camera_json(path.read_bytes(), str(path))


def read_cameras(path: str | os.PathLike) -> list[Camera]:
    """The cameras of a cameras file (our JSON or a transforms.json)."""
    return cameras_from_document(read_camera_document(path))


def camera_image_names(data: Any) -> list[str | None]:
    """The image file each camera of a document names (a transforms.json frame's ``file_path``, our camera's
    optional ``"image"``), None where it names none; in camera order."""
    if isinstance(data, Mapping) and "frames" in data:
        names = [f.get("file_path") if isinstance(f, Mapping) else None for f in data["frames"]]
    else:
        items = data.get("cameras", data) if isinstance(data, Mapping) else data
        items = items if isinstance(items, list) else [items]
        names = [c.get("image") if isinstance(c, Mapping) else None for c in items]
    return [str(n) if n is not None else None for n in names]


def cameras_from_document(data: Any) -> list[Camera]:
    """Cameras of any accepted JSON document: a ``transforms.json`` (has ``"frames"``) or our camera objects."""
    if isinstance(data, Mapping) and "frames" in data:
        return cameras_from_transforms(data)
    return cameras_from_json(data)


# OpenGL/Blender camera axes (x right, y up, z backward) -> OpenCV: flip the y and z camera axes.
_GL_TO_CV = np.diag([1.0, -1.0, -1.0, 1.0])


def cameras_from_transforms(data: Mapping[str, Any]) -> list[Camera]:
    """Cameras of a nerfstudio / instant-ngp ``transforms.json`` (already parsed).

    Intrinsics ``fl_x``, ``fl_y``, ``cx``, ``cy``, ``w``, ``h`` at the top level or per frame (a frame's own
    value wins); ``camera_angle_x`` (Blender) gives fl_x = w / (2 tan(angle/2)) when fl_x is absent, and fl_y
    defaults to fl_x. cx, cy default to the image centre w/2, h/2. Those files put pixel centres at +0.5, so
    0.5 is subtracted from cx and cy to reach this module's integer-centre convention. ``transform_matrix`` is
    camera-to-world with OpenGL axes; its y and z camera axes are flipped. Lens distortion is not supported:
    non-zero k1..k4, p1, p2 raise an error. ``camera_angle_x`` must lie in (0, pi) radians.
    """
    if not isinstance(data, Mapping) or not isinstance(data.get("frames"), Sequence) or not data["frames"]:
        raise CameraError("transforms.json must be an object with a non-empty 'frames' list")
    cams = []
    for i, frame in enumerate(data["frames"]):
        if not isinstance(frame, Mapping):
            raise CameraError(f"frame {i}: not an object")
        merged = {**data, **frame}
        try:
            for key in ("k1", "k2", "k3", "k4", "p1", "p2"):
                if merged.get(key) is not None and _require_float(merged, key) != 0.0:
                    raise CameraError(f"lens distortion ({key}) is not supported; undistort the images first")
            w, h = _require_int(merged, "w"), _require_int(merged, "h")
            if "fl_x" in merged:
                fl_x = _require_float(merged, "fl_x")
            elif "camera_angle_x" in merged:
                angle = _require_float(merged, "camera_angle_x")
                if not 0.0 < angle < math.pi:
                    raise CameraError(f"'camera_angle_x' must be an angle in (0, pi) radians, got {angle!r}")
                fl_x = 0.5 * w / math.tan(0.5 * angle)
            else:
                raise CameraError("needs 'fl_x' or 'camera_angle_x'")
            fl_y = _require_float(merged, "fl_y") if "fl_y" in merged else fl_x
            cx = _require_float(merged, "cx") if "cx" in merged else w / 2.0
            cy = _require_float(merged, "cy") if "cy" in merged else h / 2.0
            if "transform_matrix" not in frame:
                raise CameraError("needs 'transform_matrix'")
            c2w_gl = _matrix(frame["transform_matrix"], (4, 4), "transform_matrix")
            _check_rigid(c2w_gl, "transform_matrix")
            K = np.array([[fl_x, 0.0, cx - 0.5], [0.0, fl_y, cy - 0.5], [0.0, 0.0, 1.0]])
            cams.append(Camera(K=K, w2c=np.linalg.inv(c2w_gl @ _GL_TO_CV), width=w, height=h))
        except CameraError as exc:
            raise CameraError(f"frame {i}: {exc}") from None
    return cams


def finite_number(value: Any, name: str) -> float:
    """``value`` as a finite float, else a CameraError naming ``name``: the one number check of the camera
    parsers (refuses bools, strings, NaN, infinities and integers too large for a float)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CameraError(f"'{name}' must be a finite number, got {_shown(value)}")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise CameraError(f"'{name}' must be a finite number, got {_shown(value)}")
    return number


def _require_int(data: Mapping[str, Any], key: str) -> int:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or (isinstance(value, float) and not value.is_integer()) or not 1 <= value <= MAX_SIDE:  # NaN, inf too
        raise CameraError(f"'{key}' must be an integer from 1 to {MAX_SIDE}, got {_shown(value)}")
    return int(value)


def _require_float(data: Mapping[str, Any], key: str) -> float:
    return finite_number(data.get(key), key)


def _shown(value: Any) -> str:
    """A value for an error message, cut short (a 4000-digit integer or a huge list stays readable)."""
    if isinstance(value, int) and value.bit_length() > 256:
        return f"an integer of about {int(value.bit_length() * math.log10(2)) + 1} digits"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _matrix(value: Any, shape: tuple[int, int], name: str) -> np.ndarray:
    try:
        m = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError, OverflowError, RecursionError):
        raise CameraError(f"'{name}' must be a {shape[0]}x{shape[1]} matrix of numbers") from None
    if m.shape != shape or not np.all(np.isfinite(m)):
        raise CameraError(f"'{name}' must be a finite {shape[0]}x{shape[1]} matrix, got shape {m.shape}")
    return m


def _check_rigid(pose: np.ndarray, name: str) -> None:
    """A rigid 4x4 pose whose translation (for either direction, the camera centre's distance from the world
    origin) is within ``MAX_TRANSLATION`` metres."""
    if not np.allclose(pose[3], (0, 0, 0, 1)):
        raise CameraError(f"the last row of '{name}' must be [0, 0, 0, 1]")
    R = pose[:3, :3]
    if not np.allclose(R @ R.T, np.eye(3), atol=1e-4) or np.linalg.det(R) < 0:
        raise CameraError(f"the rotation of '{name}' must be orthonormal with determinant +1")
    if np.abs(pose[:3, 3]).max() > MAX_TRANSLATION:
        raise CameraError(f"the translation of '{name}' must be within ±{MAX_TRANSLATION:g} m of the world origin, "
                          f"got {np.round(pose[:3, 3], 3).tolist()}")

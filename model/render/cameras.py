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
cameras file of either kind.
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
                or self.width < 1 or self.height < 1:
            raise CameraError(f"width and height must be positive integers, got {self.width!r} x {self.height!r}")
        if K.shape != (3, 3) or not np.all(np.isfinite(K)):
            raise CameraError(f"K must be a finite 3x3 matrix, got shape {K.shape}")
        if K[0, 0] <= 0 or K[1, 1] <= 0 or abs(K[0, 1]) > 0 or np.any(K[2] != (0, 0, 1)) or K[1, 0] != 0:
            raise CameraError("K must be [[fx, 0, cx], [0, fy, cy], [0, 0, 1]] with fx, fy > 0")
        if w2c.shape != (4, 4) or not np.all(np.isfinite(w2c)):
            raise CameraError(f"world_to_camera must be a finite 4x4 matrix, got shape {w2c.shape}")
        if not np.allclose(w2c[3], (0, 0, 0, 1)):
            raise CameraError("the last row of a 4x4 camera pose must be [0, 0, 0, 1]")
        R = w2c[:3, :3]
        if not np.allclose(R @ R.T, np.eye(3), atol=1e-4) or np.linalg.det(R) < 0:
            raise CameraError("the camera rotation must be orthonormal with determinant +1 (a rigid pose in metres)")

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
    if K[0, 0] <= 0 or K[1, 1] <= 0 or K[0, 1] != 0 or K[1, 0] != 0 or np.any(K[2] != (0, 0, 1)):
        raise CameraError("K must be [[fx, 0, cx], [0, fy, cy], [0, 0, 1]] with fx, fy > 0")
    return K


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


def read_camera_document(path: str | os.PathLike) -> Any:
    """The parsed JSON of a cameras file (what ``cameras_from_document`` and ``camera_image_names`` take):
    the one reader of camera files for ``ponder render`` and the image branch. FileNotFoundError when the file
    is absent, CameraError naming it when it is not JSON."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such cameras file")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise CameraError(f"{path}: not valid JSON ({exc})") from None


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
    non-zero k1..k4, p1, p2 raise an error.
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
                if float(merged.get(key, 0.0) or 0.0) != 0.0:
                    raise CameraError(f"lens distortion ({key}) is not supported; undistort the images first")
            w, h = _require_int(merged, "w"), _require_int(merged, "h")
            if "fl_x" in merged:
                fl_x = _require_float(merged, "fl_x")
            elif "camera_angle_x" in merged:
                fl_x = 0.5 * w / math.tan(0.5 * _require_float(merged, "camera_angle_x"))
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


def _require_int(data: Mapping[str, Any], key: str) -> int:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < 1:
        raise CameraError(f"'{key}' must be a positive integer, got {value!r}")
    return int(value)


def _require_float(data: Mapping[str, Any], key: str) -> float:
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CameraError(f"'{key}' must be a finite number, got {value!r}")
    return float(value)


def _matrix(value: Any, shape: tuple[int, int], name: str) -> np.ndarray:
    try:
        m = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise CameraError(f"'{name}' must be a {shape[0]}x{shape[1]} matrix of numbers") from None
    if m.shape != shape or not np.all(np.isfinite(m)):
        raise CameraError(f"'{name}' must be a finite {shape[0]}x{shape[1]} matrix, got shape {m.shape}")
    return m


def _check_rigid(pose: np.ndarray, name: str) -> None:
    if not np.allclose(pose[3], (0, 0, 0, 1)):
        raise CameraError(f"the last row of '{name}' must be [0, 0, 0, 1]")
    R = pose[:3, :3]
    if not np.allclose(R @ R.T, np.eye(3), atol=1e-4) or np.linalg.det(R) < 0:
        raise CameraError(f"the rotation of '{name}' must be orthonormal with determinant +1")

"""The official point-cloud training transforms (spec §7.4), in numpy.

Every transform is a callable ``t(data, rng) -> data`` over a data dict, drawing all randomness from the
explicit ``np.random.Generator`` (so the engine's per-sample RNG makes runs repeat and resume exactly).
Per-point arrays are the keys in ``POINT_KEYS`` that are present; they are subset together.

Transforms that move points by a homogeneous 4x4 ``S`` (p' = S p) also update every 4x4 world-to-camera
matrix named in ``keys`` (shape (4, 4) or (V, 4, 4)) as ``M <- M · S^-1``, so each camera keeps seeing
the moved points at the same pixels and depths (camera coordinates stay metric).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import numpy as np

from model.pointcloud.voxelize import center_shift, grid_sample

Data = dict[str, Any]
Transform = Callable[[Data, np.random.Generator], Data]

# Per-point arrays, subset together by dropout, cropping, shuffling and grid sampling.
POINT_KEYS = ("coord", "grid_coord", "color", "normal", "strength", "segment", "instance", "index")


class Compose:
    """Apply transforms in order with one RNG."""

    def __init__(self, transforms: Iterable[Transform]):
        self.transforms = list(transforms)

    def __call__(self, data: Data, rng: np.random.Generator) -> Data:
        for t in self.transforms:
            data = t(data, rng)
        return data


# ------------------------------------------------------------------------------------------ helpers


def select_points(data: Data, index: np.ndarray) -> Data:
    """Keep rows ``index`` of every per-point array (``POINT_KEYS`` present with as many rows as coord)."""
    n = len(data["coord"])
    for key in POINT_KEYS:
        if key in data and data[key] is not None and len(data[key]) == n:
            data[key] = data[key][index]
    return data


def update_cameras(data: Data, keys: Sequence[str], transform: np.ndarray) -> Data:
    """``M <- M · S^-1`` for the world-to-camera matrices named in ``keys`` (float64 arithmetic)."""
    if not keys:
        return data
    inv = np.linalg.inv(np.asarray(transform, dtype=np.float64))
    for key in keys:
        if key not in data:
            raise KeyError(f"camera matrix {key!r} is not in the sample (keys: {sorted(data)})")
        m = np.asarray(data[key], dtype=np.float64)
        if m.shape[-2:] != (4, 4):
            raise ValueError(f"{key} must be 4x4 matrices, got shape {m.shape}")
        data[key] = m @ inv
    return data


def _translation(t: np.ndarray) -> np.ndarray:
    m = np.eye(4)
    m[:3, 3] = t
    return m


def _linear(a: np.ndarray) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = a
    return m


def rotation_matrix(axis: str, angle: float) -> np.ndarray:
    """The official right-handed rotation by ``angle`` radians about x, y or z (3x3)."""
    c, s = np.cos(angle), np.sin(angle)
    if axis == "x":
        return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    if axis == "y":
        return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    if axis == "z":
        return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    raise ValueError(f"rotation axis must be 'x', 'y' or 'z', got {axis!r}")


def _float_color(data: Data) -> np.ndarray | None:
    """Colour as float32 0..255 (the chromatic transforms work in float, as the official loaders store it)."""
    if data.get("color") is None:
        return None
    data["color"] = np.asarray(data["color"]).astype(np.float32, copy=False)
    return data["color"]


# ------------------------------------------------------------------------------------------ geometry


class CenterShift:
    """coord -= ((xmin+xmax)/2, (ymin+ymax)/2, zmin if apply_z else 0): the inference pipeline's
    ``model.pointcloud.voxelize.center_shift``, plus the cameras named in ``keys``."""

    def __init__(self, apply_z: bool = True, keys: Sequence[str] = ()):
        self.apply_z, self.keys = apply_z, tuple(keys)

    def __call__(self, data: Data, rng: np.random.Generator) -> Data:
        data["coord"], shift = center_shift(data["coord"], self.apply_z)
        return update_cameras(data, self.keys, _translation(-shift.astype(np.float64)))


class RandomDropout:
    """With probability ``p`` keep ``int(n·(1 - ratio))`` points drawn without replacement."""

    def __init__(self, ratio: float = 0.2, p: float = 0.5):
        if not 0 <= ratio < 1:
            raise ValueError(f"dropout ratio must lie in [0, 1), got {ratio}")
        self.ratio, self.p = ratio, p

    def __call__(self, data: Data, rng: np.random.Generator) -> Data:
        if rng.random() < self.p:
            n = len(data["coord"])
            data = select_points(data, rng.choice(n, int(n * (1 - self.ratio)), replace=False))
        return data


class RandomRotate:
    """With probability ``p``: θ = U(angle)·π about ``axis`` through ``center`` (None: the bbox centre).
    Normals rotate with the points."""

    def __init__(self, angle: Sequence[float] = (-1.0, 1.0), axis: str = "z", center: Sequence[float] | None = None,
                 p: float = 0.5, keys: Sequence[str] = ()):
        rotation_matrix(axis, 0.0)  # validates the axis
        self.angle, self.axis, self.p, self.keys = tuple(angle), axis, p, tuple(keys)
        self.center = None if center is None else np.asarray(center, dtype=np.float64)

    def _theta(self, rng: np.random.Generator) -> float:
        return rng.uniform(self.angle[0], self.angle[1]) * np.pi

    def __call__(self, data: Data, rng: np.random.Generator) -> Data:
        if rng.random() > self.p:
            return data
        return self.rotate(data, self._theta(rng))

    def rotate(self, data: Data, theta: float) -> Data:
        rot = rotation_matrix(self.axis, theta)
        coord = data["coord"]
        if self.center is None:
            center = (coord.min(axis=0).astype(np.float64) + coord.max(axis=0)) / 2
        else:
            center = self.center
        data["coord"] = ((coord - center) @ rot.T + center).astype(coord.dtype)
        if data.get("normal") is not None:
            data["normal"] = (data["normal"] @ rot.T).astype(data["normal"].dtype)
        return update_cameras(data, self.keys, _translation(center) @ _linear(rot) @ _translation(-center))


class RandomRotateTargetAngle(RandomRotate):
    """As RandomRotate with θ = choice(angles)·π (the test-time rotations use p = 1)."""

    def __init__(self, angle: Sequence[float] = (0.5, 1.0, 1.5), axis: str = "z",
                 center: Sequence[float] | None = None, p: float = 0.75, keys: Sequence[str] = ()):
        super().__init__(angle, axis, center, p, keys)

    def _theta(self, rng: np.random.Generator) -> float:
        return float(rng.choice(self.angle)) * np.pi


class RandomScale:
    """s = U(scale), one scalar (or one per axis when anisotropic); coord *= s and ``depth_scale *= s``, so
    the metric depth targets follow the scaled scene."""

    def __init__(self, scale: Sequence[float] = (0.95, 1.05), anisotropic: bool = False, keys: Sequence[str] = ()):
        if anisotropic and keys:
            raise ValueError("anisotropic scaling is not a similarity; it cannot keep cameras consistent")
        self.scale, self.anisotropic, self.keys = tuple(scale), anisotropic, tuple(keys)

    def __call__(self, data: Data, rng: np.random.Generator) -> Data:
        if self.anisotropic and "depth_scale" in data:
            raise ValueError("anisotropic scaling cannot keep depth_scale consistent; use isotropic scaling")
        s = rng.uniform(self.scale[0], self.scale[1], 3 if self.anisotropic else 1)
        data["coord"] = (data["coord"] * s).astype(data["coord"].dtype)
        if not self.anisotropic:
            if "depth_scale" in data:
                data["depth_scale"] = data["depth_scale"] * float(s[0])
            data = update_cameras(data, self.keys, _linear(np.eye(3) * float(s[0])))
        return data


class RandomFlip:
    """Independently with probability ``p`` each: negate x (and normal x), then y (and normal y)."""

    def __init__(self, p: float = 0.5, keys: Sequence[str] = ()):
        self.p, self.keys = p, tuple(keys)

    def __call__(self, data: Data, rng: np.random.Generator) -> Data:
        for axis in (0, 1):
            if rng.random() < self.p:
                data["coord"] = data["coord"].copy()
                data["coord"][:, axis] = -data["coord"][:, axis]
                if data.get("normal") is not None:
                    data["normal"] = data["normal"].copy()
                    data["normal"][:, axis] = -data["normal"][:, axis]
                flip = np.ones(3)
                flip[axis] = -1
                data = update_cameras(data, self.keys, _linear(np.diag(flip)))
        return data


class RandomJitter:
    """coord += clip(σ·N(0, 1), -clip, clip) per point and axis (not rigid: no camera update)."""

    def __init__(self, sigma: float = 0.01, clip: float = 0.05):
        if clip <= 0:
            raise ValueError(f"jitter clip must be positive, got {clip}")
        self.sigma, self.clip = sigma, clip

    def __call__(self, data: Data, rng: np.random.Generator) -> Data:
        coord = data["coord"]
        jitter = np.clip(self.sigma * rng.standard_normal(coord.shape), -self.clip, self.clip)
        data["coord"] = (coord + jitter).astype(coord.dtype)
        return data


class ElasticDistortion:
    """With probability 0.95, for each (granularity, magnitude): Gaussian noise on a grid of ``granularity``
    metres, box-blurred (3-tap, twice per axis), trilinearly interpolated at the points and added × magnitude."""

    def __init__(self, params: Sequence[Sequence[float]] = ((0.2, 0.4), (0.8, 1.6)), p: float = 0.95):
        self.params, self.p = [tuple(x) for x in params], p

    @staticmethod
    def distort(coord: np.ndarray, granularity: float, magnitude: float, rng: np.random.Generator) -> np.ndarray:
        from scipy.interpolate import RegularGridInterpolator
        from scipy.ndimage import convolve

        lo = coord.min(axis=0)
        dims = ((coord - lo).max(axis=0) // granularity).astype(int) + 3
        noise = rng.standard_normal((*dims, 3)).astype(np.float32)
        for _ in range(2):
            for axis in range(3):
                shape = [1, 1, 1, 1]
                shape[axis] = 3
                noise = convolve(noise, np.full(shape, 1 / 3, dtype=np.float32), mode="constant", cval=0)
        axes = [np.linspace(a - granularity, a + granularity * (d - 2), d) for a, d in zip(lo, dims)]
        interp = RegularGridInterpolator(axes, noise, bounds_error=False, fill_value=0)
        return (coord + interp(coord) * magnitude).astype(coord.dtype)

    def __call__(self, data: Data, rng: np.random.Generator) -> Data:
        if rng.random() < self.p:
            for granularity, magnitude in self.params:
                data["coord"] = self.distort(data["coord"], granularity, magnitude, rng)
        return data


# ------------------------------------------------------------------------------------------ colour


class _ColorTransform:
    """The gate every colour transform shares: nothing happens without colours (no draw either); else one draw
    decides, with probability ``p``, whether the colours become ``recolor(color, rng)`` (float32)."""

    p: float

    def recolor(self, color: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        raise NotImplementedError

    def __call__(self, data: Data, rng: np.random.Generator) -> Data:
        color = _float_color(data)
        if color is not None and rng.random() < self.p:
            data["color"] = self.recolor(color, rng).astype(np.float32)
        return data


class ChromaticAutoContrast(_ColorTransform):
    """With probability ``p``: stretch each channel to 0..255 and blend with β (U(0,1) when ``blend`` is None)."""

    def __init__(self, p: float = 0.2, blend: float | None = None):
        self.p, self.blend = p, blend

    def recolor(self, color: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        lo, hi = color.min(axis=0, keepdims=True), color.max(axis=0, keepdims=True)
        span = np.where(hi > lo, hi - lo, 1.0)
        contrast = np.where(hi > lo, (color - lo) * (255.0 / span), color)  # a constant channel stays
        beta = rng.random() if self.blend is None else self.blend
        return (1 - beta) * color + beta * contrast


class ChromaticTranslation(_ColorTransform):
    """With probability ``p``: one offset (U(0,1)³ - 0.5)·255·2·ratio for all points; clipped to 0..255."""

    def __init__(self, p: float = 0.95, ratio: float = 0.05):
        self.p, self.ratio = p, ratio

    def recolor(self, color: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return np.clip(color + (rng.random((1, 3)) - 0.5) * 255 * 2 * self.ratio, 0, 255)


class ChromaticJitter(_ColorTransform):
    """With probability ``p``: per-point Gaussian noise of std·255; clipped to 0..255."""

    def __init__(self, p: float = 0.95, std: float = 0.05):
        self.p, self.std = p, std

    def recolor(self, color: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return np.clip(color + rng.standard_normal((len(color), 3)) * self.std * 255, 0, 255)


# ------------------------------------------------------------------------------------------ sampling


class GridSample:
    """Official GridSample, train mode: one random point per ``grid_size`` voxel (FNV order) and
    ``grid_coord`` (int32, starting at 0). The shared implementation is ``model.pointcloud.voxelize``."""

    def __init__(self, grid_size: float = 0.02):
        if not grid_size > 0:
            raise ValueError(f"grid_size must be positive, got {grid_size}")
        self.grid_size = grid_size

    def __call__(self, data: Data, rng: np.random.Generator) -> Data:
        kept, grid_coord, _ = grid_sample(data["coord"], self.grid_size, rng)
        data = select_points(data, kept)
        data["grid_coord"] = grid_coord
        return data


class SphereCrop:
    """If there are more than ``point_max`` points (or ``int(sample_rate·n)``), keep the ones nearest a centre:
    a random point (mode "random") or point n//2 (mode "center")."""

    def __init__(self, point_max: int = 80000, sample_rate: float | None = None, mode: str = "random"):
        if mode not in ("random", "center"):
            raise ValueError(f"SphereCrop mode must be 'random' or 'center', got {mode!r}")
        self.point_max, self.sample_rate, self.mode = point_max, sample_rate, mode

    def __call__(self, data: Data, rng: np.random.Generator) -> Data:
        coord = data["coord"]
        n = len(coord)
        limit = int(self.sample_rate * n) if self.sample_rate is not None else self.point_max
        if n <= limit:
            return data
        center = coord[rng.integers(n)] if self.mode == "random" else coord[n // 2]
        nearest = np.argsort(np.sum(np.square(coord - center), axis=1), kind="stable")[:limit]
        return select_points(data, nearest)


class ShufflePoint:
    """A random permutation of every per-point array."""

    def __call__(self, data: Data, rng: np.random.Generator) -> Data:
        return select_points(data, rng.permutation(len(data["coord"])))

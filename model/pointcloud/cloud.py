"""The decoded point cloud: the one in-memory form every reader produces and every consumer takes."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


class PointCloudError(ValueError):
    """Bad or unreadable point-cloud input. The message names the source and the problem."""


# float32 spacing is 2**-10 m (0.98 mm) from 2**13 m on and doubles with every power of two beyond: coordinates
# that large (survey / UTM / ECEF metres) are moved near zero in float64 before the float32 cast.
GEOREFERENCED_METRES = 2.0**13
FLOAT32_MAX = float(np.finfo(np.float32).max)


class PointCloudTooLarge(PointCloudError):
    """Input that is well-formed enough to size but would exceed the point or memory limits
    (:class:`~model.pointcloud.formats.limits.ReadLimits`); refused before the arrays are allocated."""


@dataclass
class PointCloud:
    """A point cloud in metres, rows in input order.

    coord:  (N, 3) float32, metres (z up for indoor scenes).
    color:  (N, 3) uint8 RGB 0..255, or None when the source has no colour.
    normal: (N, 3) float32 unit normals, or None when the source has none.
    extras: other per-point arrays the source carried (e.g. ``intensity``, ``segment``,
            ``instance``), each with N rows. Readers keep them; the model ignores them.
    source: a human-readable name for error messages (file name, upload name).
    origin: (3,) float64 offset already subtracted from ``coord`` to keep float32 precision for
            georeferenced data (world = coord + origin); zeros for ordinary scans. The model is
            translation-invariant (it centre-shifts every scene), so only outputs in world
            coordinates (detected boxes) add it back.
    grid_shape: (height, width) of an organised cloud (PCD with HEIGHT > 1, as PCL/ROS write depth
            cameras' clouds, NaN holes included), rows in row-major order; None for unorganised ones.
    """

    coord: np.ndarray
    color: np.ndarray | None = None
    normal: np.ndarray | None = None
    extras: dict[str, np.ndarray] = field(default_factory=dict)
    source: str = "<memory>"
    origin: np.ndarray = field(default_factory=lambda: np.zeros(3))
    grid_shape: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        self.coord = np.ascontiguousarray(self.coord, dtype=np.float32)
        if self.coord.ndim != 2 or self.coord.shape[1] != 3:
            raise PointCloudError(f"{self.source}: coord must have shape (N, 3), got {self.coord.shape}")
        n = len(self.coord)
        if self.color is not None:
            self.color = _as_color(self.color, self.source)
            if len(self.color) != n:
                raise PointCloudError(f"{self.source}: {len(self.color)} colours for {n} points")
        if self.normal is not None:
            self.normal = np.ascontiguousarray(self.normal, dtype=np.float32)
            if self.normal.shape != (n, 3):
                raise PointCloudError(f"{self.source}: normal must have shape ({n}, 3), got {self.normal.shape}")
        if self.grid_shape is not None and int(np.prod(self.grid_shape)) != n:
            raise PointCloudError(f"{self.source}: organised shape {self.grid_shape} does not hold {n} points")
        for name, values in self.extras.items():
            if len(values) != n:
                raise PointCloudError(f"{self.source}: extra field {name!r} has {len(values)} rows for {n} points")

    def __len__(self) -> int:
        return len(self.coord)

    def world_coord(self) -> np.ndarray:
        """Coordinates in the source's own frame, for outputs: float64 ``coord + origin`` when georeferenced
        (float32 would round UTM metres to 0.25-0.5 m steps), else ``coord`` itself (float32)."""
        origin = np.asarray(self.origin, dtype=np.float64)
        return self.coord.astype(np.float64) + origin if origin.any() else self.coord

    def validate(self, finite: bool = True) -> "PointCloud":
        """Refuse clouds the model cannot take: no points, or (``finite``) NaN/inf coordinates or normals
        (``model.prepare`` can drop such rows instead)."""
        if len(self) == 0:
            raise PointCloudError(f"{self.source}: the point cloud has no points")
        if not finite:
            return self
        bad = ~np.isfinite(self.coord).all(axis=1)
        if bad.any():
            raise PointCloudError(
                f"{self.source}: {int(bad.sum())} of {len(self)} points have NaN or infinite coordinates "
                f"(first at row {int(np.argmax(bad))})"
            )
        if self.normal is not None and not np.isfinite(self.normal).all():
            raise PointCloudError(f"{self.source}: normals contain NaN or infinite values")
        return self


def float32_coords(xyz: np.ndarray, source: str) -> tuple[np.ndarray, np.ndarray]:
    """(N, 3) coordinates as the readers decoded them → (float32 coord, float64 origin), world = coord + origin.

    The one place where decoded coordinates become float32, so every format keeps the same precision.
    Input that float32 holds exactly (float32, float16, small integers) is returned unchanged with a zero
    origin. Wider input (float64, int32/64) whose magnitude reaches :data:`GEOREFERENCED_METRES` has the
    whole-metre minimum of its finite rows subtracted in float64 first (kept as ``origin``), so a survey
    in UTM metres keeps sub-millimetre steps; smaller input is cast as before (origin zero, bit for bit).
    Finite values beyond the float32 range would become inf and pass for NaN holes: they are refused.
    """
    xyz = np.asarray(xyz)
    origin = np.zeros(3)
    if (xyz.ndim != 2 or xyz.shape[1] != 3 or not len(xyz) or xyz.dtype.kind not in "biuf"
            or np.can_cast(xyz.dtype, np.float32, "safe")):  # PointCloud reports a wrong shape or dtype
        return xyz, origin
    xyz = xyz.astype(np.float64, copy=False)
    lo, hi = np.fmin.reduce(xyz, axis=0), np.fmax.reduce(xyz, axis=0)  # NaN-skipping, no copy
    if not (np.isfinite(lo).all() and np.isfinite(hi).all()):  # inf (or all-NaN columns): finite rows only
        finite = np.where(np.isfinite(xyz), xyz, np.nan)
        lo, hi = np.fmin.reduce(finite, axis=0), np.fmax.reduce(finite, axis=0)
        lo, hi = np.nan_to_num(lo, nan=0.0), np.nan_to_num(hi, nan=0.0)
    magnitude = max(np.abs(lo).max(), np.abs(hi).max())
    if magnitude > FLOAT32_MAX:
        row = int(np.flatnonzero((np.isfinite(xyz) & (np.abs(xyz) > FLOAT32_MAX)).any(axis=1))[0])
        raise PointCloudError(
            f"{source}: coordinates up to {magnitude:.3g} exceed the float32 range (+/-{FLOAT32_MAX:.3g}) the model "
            f"computes in (first at row {row}); check the coordinate units"
        )
    if magnitude >= GEOREFERENCED_METRES:
        origin = np.floor(lo)
        if (hi - origin).max() > FLOAT32_MAX:
            raise PointCloudError(f"{source}: the coordinates span more than the float32 range (+/-{FLOAT32_MAX:.3g})")
    coord = np.empty(xyz.shape, dtype=np.float32)
    np.subtract(xyz, origin, out=coord, casting="unsafe")  # float64 arithmetic, one float32 result
    return coord, origin


def _as_color(color: np.ndarray, source: str) -> np.ndarray:
    """Colours as uint8 0..255. Float input in [0, 1] is scaled; float input in [0, 255] is rounded;
    16-bit input (LAS) is scaled down."""
    color = np.asarray(color)
    if color.ndim != 2 or color.shape[1] != 3:
        raise PointCloudError(f"{source}: color must have shape (N, 3), got {color.shape}")
    if color.dtype == np.uint8:
        return np.ascontiguousarray(color)
    if np.issubdtype(color.dtype, np.floating):
        if not np.isfinite(color).all():
            raise PointCloudError(f"{source}: colours contain NaN or infinite values")
        scale = 255.0 if color.size and color.max() <= 1.0 else 1.0
        return np.clip(np.rint(color * scale), 0, 255).astype(np.uint8)
    if np.issubdtype(color.dtype, np.integer):
        top = int(color.max()) if color.size else 0
        if top > 255:  # 16-bit colour (LAS, some PLY)
            return np.clip(color // 257, 0, 255).astype(np.uint8)
        return np.clip(color, 0, 255).astype(np.uint8)
    raise PointCloudError(f"{source}: unsupported colour dtype {color.dtype}")

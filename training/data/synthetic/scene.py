"""`generate_scene`: one seeded synthetic room with its point cloud, boxes and RGB-D frames."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..classes import DETECTION_CLASS_IDS
from .camera import Frames, loop_trajectory, render_frames, scannet_depth_intrinsic
from .layout import Placer, build_shell
from .rooms import RoomType, furnish
from .sampling import sample_faces, visible_mask
from .shapes import BoxSet, SceneObject, surface_color

# Memory of one room, budgeted before it is generated. Every box face of a room is sampled before the hidden ones
# are dropped; over many seeds that sampled area stays below 3.5 x the interior shell (floor, ceiling and walls) of
# the room, and generation peaks near 190 bytes per sampled point (256 leaves room). Frames keep depth, colour and
# three label maps per pixel (22 bytes).
MAX_POINTS_PER_M2 = 1e5
ROOM_BUDGET_BYTES = 4 << 30
SAMPLED_AREA_PER_SHELL_AREA = 3.5
BYTES_PER_SAMPLED_POINT = 256
BYTES_PER_FRAME_PIXEL = 24


def _gib(n: float) -> str:
    return f"{n / (1 << 30):.1f} GiB"


def room_estimate(
    points_per_m2: float, room_x: float, room_y: float, room_z: float, num_frames: int, image_downscale: int
) -> tuple[float, float]:
    """(sampled points, bytes) of the largest room a config can draw: an upper bound, so it is checked before any
    array is allocated rather than discovered by the kernel's OOM killer."""
    shell = 2 * room_x * room_y + 2 * room_z * (room_x + room_y)
    points = SAMPLED_AREA_PER_SHELL_AREA * shell * points_per_m2
    _, width, height = scannet_depth_intrinsic(image_downscale)
    return points, points * BYTES_PER_SAMPLED_POINT + float(num_frames) * width * height * BYTES_PER_FRAME_PIXEL


def check_density(points_per_m2: float, name: str = "points_per_m2") -> None:
    """A point density must be a finite positive number no larger than MAX_POINTS_PER_M2 (numpy would otherwise
    fail with "lam value too large" or try to allocate terabytes); ``name`` is the option the user set."""
    if not isinstance(points_per_m2, (int, float)) or isinstance(points_per_m2, bool):
        raise ValueError(f"{name} must be a number, got {points_per_m2!r}")
    if not math.isfinite(points_per_m2) or not 0 < points_per_m2 <= MAX_POINTS_PER_M2:
        raise ValueError(
            f"{name} must be a finite number in (0, {MAX_POINTS_PER_M2:g}] points per m^2, got {points_per_m2}"
        )


@dataclass(frozen=True)
class SceneConfig:
    """What a room looks like and how densely it is observed.

    ceiling: off by default. ScanNet reconstructions rarely contain the ceiling (scanners point
    the camera level or down), and the cameras here look 10-25 degrees down, so the few rays that
    pass above the walls simply return no depth (0), as an unseen ceiling does in ScanNet. Turn it
    on for closed rooms; it is labelled NYU40 "ceiling" (22), which ScanNet-20 ignores (-1).
    points_per_m2: surface density of the point cloud. 1500/m^2 gives 60k-200k points per room,
    about what a ScanNet scan keeps after 2 cm voxelisation.
    """

    room_x: tuple[float, float] = (3.0, 7.0)
    room_y: tuple[float, float] = (3.0, 6.0)
    room_z: tuple[float, float] = (2.4, 3.0)
    room_types: tuple[RoomType, ...] = tuple(RoomType)
    ceiling: bool = False
    points_per_m2: float = 1500.0
    num_frames: int = 20
    image_downscale: int = 4  # 640x480 / 4 = 160x120
    camera_height: tuple[float, float] = (1.2, 1.6)
    camera_pitch_deg: tuple[float, float] = (10.0, 25.0)
    shading: bool = True

    def __post_init__(self) -> None:
        for name in ("room_x", "room_y", "room_z", "camera_height", "camera_pitch_deg"):
            lo, hi = getattr(self, name)
            if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
                raise ValueError(f"SceneConfig.{name} must be (low, high) with low <= high, got {(lo, hi)}")
        if min(self.room_x[0], self.room_y[0]) < 2.5 or self.room_z[0] < 2.2:
            raise ValueError(
                f"rooms must be at least 2.5 x 2.5 x 2.2 m, got x {self.room_x}, y {self.room_y}, z {self.room_z}"
            )
        if self.camera_height[0] < 0.5 or self.camera_height[1] > self.room_z[0] - 0.3:
            raise ValueError(f"camera_height {self.camera_height} must lie in [0.5, lowest ceiling - 0.3 m]")
        if not self.room_types:
            raise ValueError("SceneConfig.room_types is empty")
        check_density(self.points_per_m2)
        if self.num_frames < 0:
            raise ValueError(f"SceneConfig.num_frames must be >= 0, got {self.num_frames}")
        scannet_depth_intrinsic(self.image_downscale)  # validates the factor
        self.check_budget()

    def check_budget(self) -> None:
        """Refuse a room whose estimated memory exceeds ROOM_BUDGET_BYTES, naming the estimate and what to lower."""
        x, y, z = self.room_x[1], self.room_y[1], self.room_z[1]
        points, needed = room_estimate(self.points_per_m2, x, y, z, self.num_frames, self.image_downscale)
        if needed > ROOM_BUDGET_BYTES:
            raise ValueError(
                f"a room of up to {x:g} x {y:g} x {z:g} m at points_per_m2 {self.points_per_m2:g} with "
                f"{self.num_frames} frames would need about {_gib(needed)} of memory ({points / 1e6:,.0f} million "
                f"sampled points), over the budget of {_gib(ROOM_BUDGET_BYTES)} per room; lower points_per_m2 "
                "(--points-per-m2), the room size or the number of frames"
            )


@dataclass
class ScenePoints:
    """The scan: N points on the visible surfaces."""

    coord: np.ndarray  # (N, 3) float32 metres, z up, floor at z = 0
    color: np.ndarray  # (N, 3) uint8
    normal: np.ndarray  # (N, 3) float32 unit, out of the solid (into the room for walls and floor)
    segment: np.ndarray  # (N,) int64 ScanNet-20 index or -1
    instance: np.ndarray  # (N,) int64 object id (walls and floor have ids too, as in ScanNet)

    def __len__(self) -> int:
        return len(self.coord)


@dataclass
class Scene:
    seed: int
    room_type: RoomType
    room_size: np.ndarray  # (3,) W, D, H; the interior is [0, W] x [0, D] x [0, H]
    objects: list[SceneObject]  # objects[i].instance == i
    boxes: BoxSet  # every part box; boxes.obj indexes objects
    points: ScenePoints
    frames: Frames | None = field(default=None)

    def detection_boxes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(M, 7) boxes [cx, cy, cz, dx, dy, dz, yaw], (M,) ScanNet-20 labels and (M,) instance ids
        of the objects in the detection classes (DETECTION_CLASS_IDS)."""
        chosen = [o for o in self.objects if o.label in DETECTION_CLASS_IDS]
        boxes = np.array([o.box7() for o in chosen], dtype=np.float32).reshape(-1, 7)
        return (
            boxes,
            np.array([o.label for o in chosen], dtype=np.int64),
            np.array([o.instance for o in chosen], dtype=np.int64),
        )


def _sample_points(
    objects: list[SceneObject], boxes: BoxSet, room_size: np.ndarray, config: SceneConfig, rng: np.random.Generator
) -> ScenePoints:
    points, normals, box = sample_faces(boxes, config.points_per_m2, rng)
    keep = visible_mask(points, normals, boxes, room_size)
    points, normals, box = points[keep], normals[keep], box[keep]
    obj = boxes.obj[box]
    return ScenePoints(
        coord=points.astype(np.float32),
        color=surface_color(boxes, box, points, normals, config.shading),
        normal=normals.astype(np.float32),
        segment=np.array([o.label for o in objects], dtype=np.int64)[obj],
        instance=np.array([o.instance for o in objects], dtype=np.int64)[obj],
    )


def generate_scene(seed: int, config: SceneConfig | None = None) -> Scene:
    """A deterministic room for a seed: layout, point cloud and (num_frames > 0) RGB-D frames.

    Layout, points and cameras draw from separate streams of the seed, so changing the point
    density or the number of frames leaves the room itself unchanged.
    """
    config = config or SceneConfig()
    layout_rng, point_rng, camera_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))
    room_type = RoomType(int(layout_rng.choice([int(t) for t in config.room_types])))
    size = np.array(
        [layout_rng.uniform(*config.room_x), layout_rng.uniform(*config.room_y), layout_rng.uniform(*config.room_z)]
    )
    placer = Placer(layout_rng, size)
    build_shell(layout_rng, placer, config.ceiling)
    furnish(placer, room_type)
    objects = placer.objects
    for i, obj in enumerate(objects):
        obj.instance = i
    boxes = BoxSet.from_objects(objects)
    points = _sample_points(objects, boxes, size, config, point_rng)
    frames = None
    if config.num_frames > 0:
        intrinsic, width, height = scannet_depth_intrinsic(config.image_downscale)
        poses = loop_trajectory(
            camera_rng, size, boxes, config.num_frames, config.camera_height, config.camera_pitch_deg
        )
        frames = render_frames(objects, boxes, intrinsic, poses, width, height, config.shading)
    return Scene(seed, room_type, size, objects, boxes, points, frames)

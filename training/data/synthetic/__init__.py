"""Procedural indoor rooms (boxes and box composites) with exact point clouds and ray-cast RGB-D frames."""

from .dataset import add_generate_arguments, generate_dataset, run_generate
from .rooms import RoomType
from .scene import Scene, SceneConfig, ScenePoints, generate_scene

__all__ = [
    "RoomType",
    "Scene",
    "SceneConfig",
    "ScenePoints",
    "add_generate_arguments",
    "generate_dataset",
    "generate_scene",
    "run_generate",
]

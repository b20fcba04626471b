"""Files people can open in MeshLab / CloudCompare: labelled points coloured by class, and boxes as
wireframes (PLY ``edge`` elements). One fixed palette, so a class has the same colour in every file."""

from __future__ import annotations

import colorsys
from pathlib import Path

import numpy as np

from model.files import replaced_on_success

# Twenty well-separated colours (class 0, 1, ...); classes beyond them get golden-ratio hues.
_BASE = np.array([
    [174, 199, 232], [152, 223, 138], [31, 119, 180], [255, 187, 120], [188, 189, 34], [140, 86, 75],
    [255, 152, 150], [214, 39, 40], [197, 176, 213], [148, 103, 189], [196, 156, 148], [23, 190, 207],
    [247, 182, 210], [219, 219, 141], [255, 127, 14], [158, 218, 229], [44, 160, 44], [112, 128, 144],
    [227, 119, 194], [82, 84, 163]], dtype=np.uint8)
IGNORED = np.array([0, 0, 0], dtype=np.uint8)                 # labels < 0 (ignored / unlabelled)

# The 12 edges of a box whose 8 corners are the bottom face then the top face (model.detection.box_corners).
BOX_EDGES = np.array([[0, 1], [1, 2], [2, 3], [3, 0], [4, 5], [5, 6], [6, 7], [7, 4],
                      [0, 4], [1, 5], [2, 6], [3, 7]], dtype=np.int32)


def palette(num_classes: int) -> np.ndarray:
    """(num_classes, 3) uint8 RGB, the same prefix for any ``num_classes``."""
    if num_classes <= len(_BASE):
        return _BASE[:num_classes].copy()
    extra = []
    for i in range(len(_BASE), num_classes):
        r, g, b = colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.65, 0.95)
        extra.append([round(r * 255), round(g * 255), round(b * 255)])
    return np.concatenate([_BASE, np.array(extra, dtype=np.uint8)])


def label_colors(labels: np.ndarray, num_classes: int) -> np.ndarray:
    labels = np.asarray(labels)
    table = palette(max(num_classes, int(labels.max(initial=-1)) + 1))
    colors = np.empty((len(labels), 3), dtype=np.uint8)
    valid = labels >= 0
    colors[valid] = table[labels[valid]]
    colors[~valid] = IGNORED
    return colors


def _coord_dtype(coord: np.ndarray) -> str:
    return "f8" if coord.dtype == np.float64 else "f4"


def _write(path: Path, elements) -> None:
    from plyfile import PlyData

    with replaced_on_success(path) as tmp:
        PlyData(elements, text=False, byte_order="<").write(str(tmp))


def write_labelled_points(path: str | Path, coord: np.ndarray, labels: np.ndarray, class_names) -> None:
    """Binary PLY: x, y, z, red, green, blue (the class colour) and ``label`` (int32 class index) per point.
    ``coord`` float64 (world coordinates of georeferenced data) is kept as double."""
    from plyfile import PlyElement

    coord = np.asarray(coord)
    labels = np.asarray(labels).astype(np.int32)
    if len(coord) != len(labels):
        raise ValueError(f"{len(coord)} points but {len(labels)} labels")
    ct = _coord_dtype(coord)
    vertex = np.empty(len(coord), dtype=[("x", ct), ("y", ct), ("z", ct), ("red", "u1"), ("green", "u1"),
                                         ("blue", "u1"), ("label", "i4")])
    for i, axis in enumerate("xyz"):
        vertex[axis] = coord[:, i]
    rgb = label_colors(labels, len(class_names))
    vertex["red"], vertex["green"], vertex["blue"] = rgb[:, 0], rgb[:, 1], rgb[:, 2]
    vertex["label"] = labels
    element = PlyElement.describe(vertex, "vertex",
                                  comments=["label: " + " ".join(f"{i}={n}" for i, n in enumerate(class_names))])
    _write(Path(path), [element])


def write_box_wireframes(path: str | Path, corners: np.ndarray, labels: np.ndarray, class_names) -> None:
    """Binary PLY of K boxes: 8 vertices per box (x, y, z, colour, ``label``) and 12 ``edge`` elements per box
    (vertex1, vertex2, colour). ``corners`` (K, 8, 3) in the order of ``model.detection.box_corners``."""
    from plyfile import PlyElement

    corners = np.asarray(corners, dtype=np.float64).reshape(-1, 8, 3)
    labels = np.asarray(labels).astype(np.int32).reshape(-1)
    k = len(corners)
    rgb = label_colors(labels, len(class_names))
    vertex = np.empty(k * 8, dtype=[("x", "f8"), ("y", "f8"), ("z", "f8"), ("red", "u1"), ("green", "u1"),
                                    ("blue", "u1"), ("label", "i4")])
    flat = corners.reshape(-1, 3)
    for i, axis in enumerate("xyz"):
        vertex[axis] = flat[:, i]
    vrgb = np.repeat(rgb, 8, axis=0)
    vertex["red"], vertex["green"], vertex["blue"] = vrgb[:, 0], vrgb[:, 1], vrgb[:, 2]
    vertex["label"] = np.repeat(labels, 8)
    edge = np.empty(k * 12, dtype=[("vertex1", "i4"), ("vertex2", "i4"), ("red", "u1"), ("green", "u1"),
                                   ("blue", "u1")])
    pairs = (BOX_EDGES[None] + 8 * np.arange(k, dtype=np.int32)[:, None, None]).reshape(-1, 2)
    edge["vertex1"], edge["vertex2"] = pairs[:, 0], pairs[:, 1]
    ergb = np.repeat(rgb, 12, axis=0)
    edge["red"], edge["green"], edge["blue"] = ergb[:, 0], ergb[:, 1], ergb[:, 2]
    comment = "label: " + " ".join(f"{i}={n}" for i, n in enumerate(class_names))
    _write(Path(path), [PlyElement.describe(vertex, "vertex", comments=[comment]), PlyElement.describe(edge, "edge")])

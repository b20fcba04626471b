"""Class lists shared by the generator, the on-disk readers and training.

Semantic labels follow ScanNet-20 exactly (names and order of the official
``configs/scannet/semseg-ppt-...`` ``data.names``), so a model trained on the synthetic rooms is
scored against the same indices as one trained on real ScanNet. -1 is the ignore label.

On disk, 2D label images store NYU40 ids (as ScanNet's ``label-filt`` export does); the official
mapping ``VALID_CLASS_IDS_20`` turns them into ScanNet-20 indices.
"""

from __future__ import annotations

import numpy as np

from model.config import SCANNET20_NAMES  # re-exported: ScanNet-20 names in label order

IGNORE_INDEX = -1

# NYU40 id of each ScanNet-20 class (index i -> VALID_CLASS_IDS_20[i]).
VALID_CLASS_IDS_20: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 16, 24, 28, 33, 34, 36, 39)

# The NYU40 vocabulary (id = position + 1). Ids outside VALID_CLASS_IDS_20 map to IGNORE_INDEX.
NYU40_NAMES: tuple[str, ...] = (
    "wall",
    "floor",
    "cabinet",
    "bed",
    "chair",
    "sofa",
    "table",
    "door",
    "window",
    "bookshelf",
    "picture",
    "counter",
    "blinds",
    "desk",
    "shelves",
    "curtain",
    "dresser",
    "pillow",
    "mirror",
    "floor mat",
    "clothes",
    "ceiling",
    "books",
    "refrigerator",
    "television",
    "paper",
    "towel",
    "shower curtain",
    "box",
    "whiteboard",
    "person",
    "night stand",
    "toilet",
    "sink",
    "lamp",
    "bathtub",
    "bag",
    "otherstructure",
    "otherfurniture",
    "otherprop",
)
NYU40_CEILING = 22
NYU40_PILLOW = 18
NYU40_OTHERPROP = 40

# Detection classes: the 18 ScanNet-20 classes except wall and floor (the VoteNet / ScanNet
# detection benchmark set, nyu40 ids 3..39; its "garbagebin" is nyu40 39 = otherfurniture).
DETECTION_CLASS_IDS: tuple[int, ...] = tuple(range(2, 20))
DETECTION_NAMES: tuple[str, ...] = tuple(SCANNET20_NAMES[i] for i in DETECTION_CLASS_IDS)


def _nyu40_lookup() -> np.ndarray:
    table = np.full(256, IGNORE_INDEX, dtype=np.int64)
    for index, nyu in enumerate(VALID_CLASS_IDS_20):
        table[nyu] = index
    return table


_NYU40_TO_20 = _nyu40_lookup()


def nyu40_to_scannet20(ids: np.ndarray) -> np.ndarray:
    """Map NYU40 ids (any integer array, values 0..255) to ScanNet-20 indices, others to -1."""
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() > 255):
        raise ValueError(f"NYU40 ids must lie in 0..255, got range [{ids.min()}, {ids.max()}]")
    return _NYU40_TO_20[ids.astype(np.int64)]


def scannet20_to_nyu40(labels: np.ndarray) -> np.ndarray:
    """Inverse of nyu40_to_scannet20 for valid labels; -1 maps to 0 (unlabelled)."""
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size and (labels.min() < IGNORE_INDEX or labels.max() >= len(VALID_CLASS_IDS_20)):
        raise ValueError(f"ScanNet-20 labels must lie in -1..19, got range [{labels.min()}, {labels.max()}]")
    table = np.array((0,) + VALID_CLASS_IDS_20, dtype=np.int64)
    return table[labels + 1]

"""Semantic-segmentation metrics exactly as the official tester computes them (spec §8 step 6).

Per scene: points labelled ``ignore_index`` get the prediction ``ignore_index`` too, then histograms over
the classes 0..K-1 give the intersection I, the union U = area_pred + area_target - I and the target area T.
I, U and T are summed over all scenes before any ratio is taken; ``IoU_c = I_c / (U_c + 1e-10)`` and
**mIoU is the mean over all K classes**, so a class absent from both prediction and target counts as 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

EPS = 1e-10


def intersection_and_union(pred: np.ndarray, target: np.ndarray, num_classes: int,
                           ignore_index: int = -1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-class (I, U, T) counts (each (K,) int64) of one scene. pred and target: (N,) integer labels."""
    pred, target = np.asarray(pred).reshape(-1), np.asarray(target).reshape(-1)
    if pred.shape != target.shape:
        raise ValueError(f"pred has {pred.size} points but target has {target.size}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    for name, values in (("pred", pred), ("target", target)):
        if values.size and not np.issubdtype(values.dtype, np.integer):
            raise ValueError(f"{name} must hold integer labels, got {values.dtype}")
    labelled = target != ignore_index
    for name, values in (("target", target[labelled]), ("pred", pred[labelled])):
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(f"{name} labels must lie in [0, {num_classes}) (or be {ignore_index} in target); "
                             f"found {values.min()}..{values.max()}")
    pred = np.where(labelled, pred, ignore_index)  # the official tester's `output[target == ignore] = ignore`
    hit = pred[labelled & (pred == target)]
    intersection = np.bincount(hit, minlength=num_classes)
    area_pred = np.bincount(pred[labelled], minlength=num_classes)
    area_target = np.bincount(target[labelled], minlength=num_classes)
    return intersection, area_pred + area_target - intersection, area_target


@dataclass
class SegMetrics:
    """I/U/T accumulated over scenes; ratios and the printable table come from the sums."""

    num_classes: int
    class_names: Sequence[str] = ()
    ignore_index: int = -1
    intersection: np.ndarray = field(init=False)
    union: np.ndarray = field(init=False)
    target: np.ndarray = field(init=False)
    scenes: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        if self.class_names and len(self.class_names) != self.num_classes:
            raise ValueError(f"{len(self.class_names)} class names for {self.num_classes} classes")
        self.class_names = tuple(self.class_names) or tuple(f"class{i}" for i in range(self.num_classes))
        self.intersection, self.union, self.target = (np.zeros(self.num_classes, np.int64) for _ in range(3))

    def update(self, pred: np.ndarray, target: np.ndarray) -> None:
        i, u, t = intersection_and_union(pred, target, self.num_classes, self.ignore_index)
        self.intersection += i
        self.union += u
        self.target += t
        self.scenes += 1

    @property
    def iou(self) -> np.ndarray:
        return self.intersection / (self.union + EPS)

    @property
    def accuracy(self) -> np.ndarray:
        return self.intersection / (self.target + EPS)

    @property
    def miou(self) -> float:
        return float(np.mean(self.iou))

    @property
    def macc(self) -> float:
        return float(np.mean(self.accuracy))

    @property
    def allacc(self) -> float:
        return float(self.intersection.sum() / (self.target.sum() + EPS))

    def as_dict(self) -> dict:
        return {"mIoU": self.miou, "mAcc": self.macc, "allAcc": self.allacc, "scenes": self.scenes,
                "per_class": {name: {"iou": float(iou), "acc": float(acc), "points": int(t)}
                              for name, iou, acc, t in zip(self.class_names, self.iou, self.accuracy, self.target)}}

    def table(self) -> str:
        """Per-class IoU/accuracy and the three summary figures, as the official tester logs them."""
        width = max(12, *(len(n) for n in self.class_names))
        lines = [f"{'class':<{width}}  {'IoU':>7}  {'Acc':>7}  {'points':>10}"]
        for name, iou, acc, t in zip(self.class_names, self.iou, self.accuracy, self.target):
            note = "" if t else "  (absent from target)"
            lines.append(f"{name:<{width}}  {iou:7.4f}  {acc:7.4f}  {int(t):>10d}{note}")
        lines.append(f"mIoU/mAcc/allAcc {self.miou:.4f}/{self.macc:.4f}/{self.allacc:.4f} "
                     f"over {self.scenes} scene(s); mIoU averages all {self.num_classes} classes")
        return "\n".join(lines)

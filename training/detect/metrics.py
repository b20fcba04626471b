"""Detection average precision as in the VoteNet / ScanNet evaluation (``eval_det``).

Per class and IoU threshold: predictions of all scenes are ranked by score; each, in turn, is a true positive
when its best-overlapping ground-truth box of the same class in the same scene has IoU > threshold and has not
been matched yet, otherwise a false positive. Precision/recall follow from the cumulative counts; AP is the
VOC all-point interpolated area (precision made monotone from the right, summed over recall steps). mAP is
the mean over classes that have ground truth; a class without ground truth reports AP = NaN.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from model.detection.boxes import as_boxes
from model.detection.iou import iou_3d


def voc_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """All-point interpolated AP (VOC 2010+, ``use_07_metric=False``)."""
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    steps = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


@dataclass
class ClassCurve:
    """Ranked outcome of one class at one IoU threshold."""

    num_gt: int
    scores: np.ndarray      # (P,) descending
    tp: np.ndarray          # (P,) bool

    @property
    def recall(self) -> np.ndarray:
        return np.cumsum(self.tp) / max(self.num_gt, 1)

    @property
    def precision(self) -> np.ndarray:
        return np.cumsum(self.tp) / np.maximum(np.arange(1, len(self.tp) + 1), 1)

    @property
    def ap(self) -> float:
        if self.num_gt == 0:
            return float("nan")
        return voc_ap(self.recall, self.precision) if len(self.tp) else 0.0

    def recall_at(self, min_score: float = -np.inf) -> float:
        """Recall of the predictions scoring at least ``min_score``."""
        if self.num_gt == 0:
            return float("nan")
        return float(self.tp[self.scores >= min_score].sum() / self.num_gt)


@dataclass
class DetectionEvaluator:
    """Collects predictions and ground truth scene by scene, then scores them."""

    class_names: Sequence[str]
    _pred: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list, init=False)
    _gt: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list, init=False)

    def add(self, pred_boxes, pred_scores, pred_labels, gt_boxes, gt_labels) -> None:
        """One scene: predictions (K, 7), (K,), (K,) and ground truth (G, 7), (G,); labels index class_names."""
        pb, gb = as_boxes(pred_boxes, "predicted boxes"), as_boxes(gt_boxes, "ground-truth boxes")
        ps = np.asarray(pred_scores, dtype=np.float64).reshape(-1)
        pl, gl = np.asarray(pred_labels, dtype=np.int64).reshape(-1), np.asarray(gt_labels, dtype=np.int64).reshape(-1)
        if not len(pb) == len(ps) == len(pl) or len(gb) != len(gl):
            raise ValueError(f"scene {len(self._gt)}: {len(pb)} boxes, {len(ps)} scores, {len(pl)} labels predicted; "
                             f"{len(gb)} ground-truth boxes with {len(gl)} labels")
        for name, lab in (("predicted", pl), ("ground-truth", gl)):
            if lab.size and (lab.min() < 0 or lab.max() >= len(self.class_names)):
                raise ValueError(f"{name} labels must lie in [0, {len(self.class_names)}), got {lab.min()}..{lab.max()}")
        self._pred.append((pb, ps, pl))
        self._gt.append((gb, gl))

    def curve(self, label: int, iou_threshold: float) -> ClassCurve:
        entries = []  # (score, scene, box)
        for scene, (boxes, scores, labels) in enumerate(self._pred):
            for i in np.flatnonzero(labels == label):
                entries.append((scores[i], scene, boxes[i]))
        order = sorted(range(len(entries)), key=lambda k: -entries[k][0])      # stable: ties keep input order
        gt = [boxes[labels == label] for boxes, labels in self._gt]
        taken = [np.zeros(len(g), dtype=bool) for g in gt]
        tp = np.zeros(len(order), dtype=bool)
        for rank, k in enumerate(order):
            _, scene, box = entries[k]
            if len(gt[scene]) == 0:
                continue
            overlaps = iou_3d(box[None], gt[scene])[0]
            best = int(np.argmax(overlaps))
            if overlaps[best] > iou_threshold and not taken[scene][best]:
                tp[rank] = taken[scene][best] = True
        scores = np.array([entries[k][0] for k in order], dtype=np.float64)
        return ClassCurve(num_gt=int(sum(len(g) for g in gt)), scores=scores, tp=tp)

    def evaluate(self, iou_thresholds: Sequence[float] = (0.25, 0.5), min_score: float | None = None) -> "DetectionMetrics":
        results = {}
        for t in iou_thresholds:
            curves = [self.curve(c, t) for c in range(len(self.class_names))]
            results[float(t)] = curves
        return DetectionMetrics(tuple(self.class_names), results, min_score, len(self._gt))


@dataclass
class DetectionMetrics:
    class_names: tuple[str, ...]
    curves: dict[float, list[ClassCurve]]   # IoU threshold -> one curve per class
    min_score: float | None                 # also report recall of predictions scoring at least this
    scenes: int

    def ap(self, iou: float) -> np.ndarray:
        return np.array([c.ap for c in self.curves[iou]])

    def map(self, iou: float) -> float:
        aps = self.ap(iou)
        return float(np.nanmean(aps)) if np.isfinite(aps).any() else float("nan")

    def recall(self, iou: float, min_score: float = -np.inf) -> float:
        """Recall over all ground-truth boxes (pooled over classes)."""
        curves = self.curves[iou]
        gt = sum(c.num_gt for c in curves)
        hits = sum(int(c.tp[c.scores >= min_score].sum()) for c in curves)
        return hits / gt if gt else float("nan")

    def summary(self) -> dict:
        out: dict = {"scenes": self.scenes, "num_gt": [c.num_gt for c in next(iter(self.curves.values()))]}
        for t in self.curves:
            out[f"mAP@{t:g}"] = self.map(t)
            out[f"recall@{t:g}"] = self.recall(t)
            if self.min_score is not None:
                out[f"recall@{t:g}_score>={self.min_score:g}"] = self.recall(t, self.min_score)
            out[f"AP@{t:g}"] = {n: ap for n, ap in zip(self.class_names, self.ap(t).tolist())}
            out[f"recall@{t:g}_per_class"] = {n: c.recall_at() for n, c in zip(self.class_names, self.curves[t])}
        return out

    def table(self) -> str:
        """Per-class AP table plus mAP and recall rows (NaN classes shown as '-')."""
        thresholds = list(self.curves)
        counts = [c.num_gt for c in self.curves[thresholds[0]]]
        width = max(len(n) for n in self.class_names + ("class",))
        head = f"{'class':<{width}}  {'GT':>4}" + "".join(f"  {'AP@' + format(t, 'g'):>8}" for t in thresholds)
        lines = [head, "-" * len(head)]
        for c, name in enumerate(self.class_names):
            cells = "".join(f"  {_pct(self.curves[t][c].ap):>8}" for t in thresholds)
            lines.append(f"{name:<{width}}  {counts[c]:>4}{cells}")
        lines.append("-" * len(head))
        lines.append(f"{'mAP':<{width}}  {sum(counts):>4}" + "".join(f"  {_pct(self.map(t)):>8}" for t in thresholds))
        lines.append(f"{'recall':<{width}}  {'':>4}" + "".join(f"  {_pct(self.recall(t)):>8}" for t in thresholds))
        if self.min_score is not None:
            label = f"recall s>={self.min_score:g}"
            lines.append(f"{label:<{width}}  {'':>4}"
                         + "".join(f"  {_pct(self.recall(t, self.min_score)):>8}" for t in thresholds))
        return "\n".join(lines)


def _pct(value: float) -> str:
    return "-" if not np.isfinite(value) else f"{100 * value:.1f}"

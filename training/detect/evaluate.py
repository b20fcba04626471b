"""Score a detector on scenes with ground-truth boxes, through the same ``detect`` call users run."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

from model.detection.predict import detect, detector_of
from model.inference import Predictor

from .dataset import DetectionScenes
from .metrics import DetectionEvaluator, DetectionMetrics

log = logging.getLogger(__name__)


def evaluate_detector(predictor: Predictor, scene_dirs: Sequence[Path], condition: str | None = None,
                      score_threshold: float = 0.05, iou_thresholds: Sequence[float] = (0.25, 0.5),
                      report_score: float | None = 0.3) -> DetectionMetrics:
    """AP per class, mAP and recall over ``scene_dirs``; ground truth is read in the head's classes."""
    names = detector_of(predictor.model).class_names
    scenes = DetectionScenes(scene_dirs, names)
    evaluator = DetectionEvaluator(names)
    for i in range(len(scenes)):
        scene = scenes.get(i)
        found = detect(predictor, scenes.cloud(i), condition, score_threshold=score_threshold)
        evaluator.add(found.boxes, found.scores, found.labels, scene["boxes"], scene["labels"])
        log.info("%s: %d boxes predicted, %d in ground truth", scene["source"], len(found), len(scene["boxes"]))
    return evaluator.evaluate(iou_thresholds, min_score=report_score)

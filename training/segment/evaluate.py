"""Segmentation evaluation with the official metric (spec §8): every original point of every scene is scored.

* fast mode: one forward pass per scene (first point per voxel kept; each point takes its voxel's label),
  close to the official per-epoch SemSegEvaluator;
* precise mode: the official SemSegTester, ``Predictor.segment(precise=True)``: 13 test-time augmentations x
  GridSample test fragments, softmax summed per point.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from model.inference import Predictor, load_predictor
from model.pointcloud.cloud import PointCloud
from training.data.formats import load_scene
from training.metrics import SegMetrics
from training.segment.dataset import find_scenes

log = logging.getLogger(__name__)


def evaluate_scenes(predictor: Predictor, scenes: Sequence[Path], condition: str | None = None,
                    precise: bool = False, progress: bool = False) -> SegMetrics:
    """I/U/T summed over ``scenes`` (Pointcept folders or ``.pth`` files with labels)."""
    if not scenes:
        raise ValueError("no scenes to evaluate")
    condition = predictor.resolve_condition(condition)
    names = predictor.class_names(condition)
    metrics: SegMetrics | None = None
    for i, path in enumerate(scenes):
        start = time.perf_counter()
        raw = load_scene(path)
        if not (raw["segment"] != -1).any():
            raise ValueError(f"{path}: the scene has no labels to evaluate against")
        cloud = PointCloud(raw["coord"], raw.get("color"), raw.get("normal"), source=str(path))
        result = predictor.segment(cloud, condition, precise=precise)
        if metrics is None:
            k = result.logits.shape[1]
            metrics = SegMetrics(k, names if len(names) == k else ())
        metrics.update(result.labels.astype(np.int64), raw["segment"])
        if progress:
            log.info("scene %d/%d %s: %d points, %.1f s", i + 1, len(scenes), Path(path).name, len(cloud),
                     time.perf_counter() - start)
    return metrics


def evaluate_checkpoint(checkpoint: str | Path, data: str | Path, split: str = "val", precise: bool = False,
                        condition: str | None = None, device: str = "cpu", max_scenes: int | None = None,
                        trust: bool = False, progress: bool = False) -> SegMetrics:
    predictor = load_predictor(checkpoint, device, trust_checkpoint=trust)
    if not predictor.has_classifier:
        raise ValueError(f"{checkpoint}: a {predictor.config.kind} checkpoint has no segmentation head; "
                         "fine-tune one with `ponder train segment`")
    scenes = find_scenes(data, split)
    return evaluate_scenes(predictor, scenes[:max_scenes] if max_scenes else scenes, condition, precise, progress)

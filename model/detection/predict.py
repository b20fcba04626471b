"""``detect``: boxes of one point cloud from a checkpoint with a detection head (encoder + head, one pass).

The head is ``model.detector`` (attached by ``build_model`` when ``ModelConfig.detection`` is set), so a
detection checkpoint is an encoder checkpoint plus ``detector.*`` weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from model.pointcloud.cloud import PointCloud

from .boxes import box_corners
from .head import DetectionHead
from .postprocess import decode

BOX_CONVENTION = ("boxes are [cx, cy, cz, dx, dy, dz, yaw] in the input cloud's frame and units (metres): centre "
                  "of the box, full edge lengths along the box's own x/y/z axes, and yaw in radians about +z, "
                  "counter-clockwise seen from above (the box's x axis points along (cos yaw, sin yaw, 0)); "
                  "corners: bottom face then top face, each counter-clockwise from above")
JSON_FORMAT = "ponder-detections/1"


@dataclass
class DetectionResult:
    boxes: np.ndarray                # (K, 7) float32 [cx, cy, cz, dx, dy, dz, yaw], see BOX_CONVENTION
    scores: np.ndarray               # (K,) float32, descending
    labels: np.ndarray               # (K,) int64 index into class_names
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.boxes)

    def to_json(self, source: str | None = None) -> dict[str, Any]:
        """The ``ponder detect`` JSON document (``format`` ponder-detections/1)."""
        corners = box_corners(self.boxes) if len(self.boxes) else np.zeros((0, 8, 3))
        return {
            "format": JSON_FORMAT,
            "source": source,
            "box_convention": BOX_CONVENTION,
            "class_names": list(self.class_names),
            "detections": [
                {"label": self.class_names[int(label)], "label_id": int(label), "score": round(float(score), 6),
                 "center": [round(float(v), 6) for v in box[:3]], "size": [round(float(v), 6) for v in box[3:6]],
                 "yaw": round(float(box[6]), 6), "corners": np.round(c, 6).tolist()}
                for box, score, label, c in zip(self.boxes, self.scores, self.labels, corners)],
        }

    def dumps(self, source: str | None = None) -> str:
        return json.dumps(self.to_json(source), indent=1)


def detector_of(model: torch.nn.Module) -> DetectionHead:
    head = getattr(model, "detector", None)
    if not isinstance(head, DetectionHead):
        raise ValueError("this checkpoint has no 3D detection head (no detector.* weights); "
                         "train one with `ponder train detect`")
    return head


@torch.no_grad()
def head_outputs(head: DetectionHead, features: np.ndarray | torch.Tensor) -> dict[str, np.ndarray]:
    """The head's per-voxel predictions as float numpy arrays."""
    param = next(head.parameters())
    x = torch.as_tensor(features).to(param.device)
    was_training = head.training
    head.eval()
    try:
        out = head(x)
    finally:
        head.train(was_training)
    return {k: v.float().cpu().numpy() for k, v in out.items()}


def detect(predictor_or_loaded_model, cloud: PointCloud, condition: str | None = None,
           score_threshold: float | None = None, iou_threshold: float | None = None,
           grid_size: float | None = None) -> DetectionResult:
    """Oriented boxes in ``cloud``'s world frame (``cloud.origin`` added back). Accepts a
    ``model.inference.Predictor`` or a ``LoadedModel``; thresholds default to the head's ``decode``
    settings, the voxel size to the model's."""
    from model.inference import Predictor

    predictor = predictor_or_loaded_model
    if not isinstance(predictor, Predictor):
        predictor = Predictor(predictor_or_loaded_model, device=_device_of(predictor_or_loaded_model.model))
    head = detector_of(predictor.model)
    for name, value in (("score_threshold", score_threshold), ("iou_threshold", iou_threshold)):
        if value is not None and not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {value}")
    voxels = predictor.prepare(cloud, grid_size)
    (features,) = predictor.encode([voxels], condition)
    positions = cloud.coord[voxels.kept].astype(np.float64)                     # (M, 3) input frame
    found = decode(positions, head_outputs(head, features), head.cfg.decode, score_threshold, iou_threshold)
    boxes = found.boxes.astype(np.float64)
    boxes[:, :3] += np.asarray(cloud.origin, dtype=np.float64)  # georeferenced input: back to world coordinates
    return DetectionResult(boxes, found.scores.astype(np.float32), found.labels, head.class_names)


def _device_of(model: torch.nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")

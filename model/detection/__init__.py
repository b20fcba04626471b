"""3D object detection on encoder features: oriented boxes, exact 3D IoU, rotated NMS, the voting head and
``detect``. Box convention: ``boxes.py`` (``[cx, cy, cz, dx, dy, dz, yaw]``, yaw counter-clockwise about +z)."""

from .boxes import (BOX_DIM, as_boxes, bev_corners, box_corners, box_volume, canonical_boxes, points_in_boxes,
                    transform_boxes, wrap_angle)
from .head import DecodeConfig, DetectionHead, HeadConfig
from .iou import bev_intersection_area, bev_iou, iou_3d, paired_iou_3d
from .nms import batched_nms_3d, nms_3d
from .postprocess import Boxes, decode
from .predict import BOX_CONVENTION, DetectionResult, detect, detector_of, head_outputs

__all__ = [
    "BOX_CONVENTION", "BOX_DIM", "Boxes", "DecodeConfig", "DetectionHead", "DetectionResult", "HeadConfig",
    "as_boxes", "batched_nms_3d", "bev_corners", "bev_intersection_area", "bev_iou", "box_corners", "box_volume",
    "canonical_boxes", "decode", "detect", "detector_of", "head_outputs", "iou_3d", "nms_3d", "paired_iou_3d",
    "points_in_boxes", "transform_boxes", "wrap_angle",
]

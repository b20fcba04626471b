"""The image branch: posed RGB images (no depth) -> 2D ResNet features lifted into a voxel volume -> the same
render head as the point-cloud model (and a per-voxel segmentation head, model/images/segment.py). See
model/images/model.py for the shapes."""

from model.images.backbone import FeatureNeck, ResNet, load_image_weights
from model.images.checkpoint import is_image_model, load_image_model, save_image_model
from model.images.config import ImageBackboneConfig, ImageModelConfig, LiftConfig
from model.images.errors import ImageInputError
from model.images.inference import ImageFeatures, image_features, render_from_images
from model.images.inputs import PosedImages, check_views, estimate_bounds, parse_bounds, read_image_folder
from model.images.lifting import Fused, LearnedFusion, fuse_mean, lift_views, project, sample_maps, visible
from model.images.model import ImageRenderModel, LiftedScenes
from model.images.segment import (ImageSegmentation, ImageSegmentConfig, ImageSegmentModel, load_image_segment_model,
                                  segment_from_images)

__all__ = [
    "FeatureNeck", "ResNet", "load_image_weights", "is_image_model", "load_image_model", "save_image_model",
    "ImageBackboneConfig", "ImageModelConfig", "LiftConfig", "ImageInputError", "ImageFeatures", "image_features",
    "render_from_images", "PosedImages", "check_views", "estimate_bounds", "parse_bounds", "read_image_folder",
    "Fused", "LearnedFusion", "fuse_mean", "lift_views", "project", "sample_maps", "visible", "ImageRenderModel",
    "LiftedScenes", "ImageSegmentation", "ImageSegmentConfig", "ImageSegmentModel", "load_image_segment_model",
    "segment_from_images",
]

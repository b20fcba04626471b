"""The neural-rendering part of PonderIndoor-v2 (spec §5): unit cube, dense volume, UNet3D projection,
SDF field, NeuS sampling and rendering, training rays, losses, and novel-view rendering."""

from model.render.cameras import Camera, CameraError, cameras_from_json, cameras_from_transforms
from model.render.config import (ColliderConfig, DecoderConfig, FieldConfig, LossConfig, ProjectionConfig,
                                 RenderConfigError, RenderHeadConfig, SamplerConfig, head_field_config,
                                 infer_head_config, legacy_field_config)
from model.render.dense import grid_resolution, to_dense
from model.render.field import SDFField, normalize_3d_coordinate
from model.render.head import PonderRenderHead, head_state_dict
from model.render.losses import render_losses, total_loss
from model.render.rays import TrainingRays, get_rays, sample_training_rays
from model.render.renderer import NeuSRenderer
from model.render.trilinear import GridVolume, sample, trilinear_sample
from model.render.unet3d import UNet3D
from model.render.unit_cube import UnitCube, UnitCubeScene, to_unit_cube
from model.render.views import RenderedView, render_views

__all__ = [
    "Camera", "CameraError", "cameras_from_json", "cameras_from_transforms",
    "ColliderConfig", "DecoderConfig", "FieldConfig", "LossConfig", "ProjectionConfig", "RenderConfigError",
    "RenderHeadConfig", "SamplerConfig", "head_field_config", "infer_head_config", "legacy_field_config",
    "grid_resolution", "to_dense", "SDFField", "normalize_3d_coordinate", "PonderRenderHead", "head_state_dict",
    "render_losses", "total_loss", "TrainingRays", "get_rays", "sample_training_rays", "NeuSRenderer",
    "GridVolume", "sample", "trilinear_sample", "UNet3D", "UnitCube", "UnitCubeScene", "to_unit_cube",
    "RenderedView", "render_views",
]

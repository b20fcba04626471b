"""The neural-rendering part of PonderIndoor-v2 (spec §5): unit cube, dense volume, UNet3D projection,
SDF field, NeuS sampling and rendering, training rays, losses, and novel-view rendering.

Names are resolved lazily (PEP 562) so that importing a torch-free submodule such as
``model.render.cameras`` does not import torch: the slim gateway parses cameras without it."""

from importlib import import_module

_EXPORTS: dict[str, tuple[str, ...]] = {
    "cameras": ("Camera", "CameraError", "cameras_from_json", "cameras_from_transforms"),
    "config": ("ColliderConfig", "DecoderConfig", "FieldConfig", "LossConfig", "ProjectionConfig",
               "RenderConfigError", "RenderHeadConfig", "SamplerConfig", "head_field_config",
               "infer_head_config", "legacy_field_config"),
    "dense": ("grid_resolution", "to_dense"),
    "field": ("SDFField", "normalize_3d_coordinate"),
    "head": ("PonderRenderHead", "head_state_dict"),
    "losses": ("render_losses", "total_loss"),
    "rays": ("TrainingRays", "get_rays", "sample_training_rays"),
    "renderer": ("NeuSRenderer",),
    "trilinear": ("GridVolume", "sample", "trilinear_sample"),
    "unet3d": ("UNet3D",),
    "unit_cube": ("UnitCube", "UnitCubeScene", "to_unit_cube"),
    "views": ("RenderedView", "render_views"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = list(_MODULE_OF)


def __getattr__(name: str):
    if name in _MODULE_OF:
        return getattr(import_module(f"model.render.{_MODULE_OF[name]}"), name)
    raise AttributeError(f"module 'model.render' has no attribute {name!r}")

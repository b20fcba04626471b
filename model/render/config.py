"""Configuration of the PonderIndoor-v2 render head (projection UNet3D + NeuS renderer), spec §5.

Two checkpoint eras exist (spec §10.3): the HEAD layout (``share_volume=False``, decoder in_dims
64/134/131, ``points_factor=0``, normalised field points) and the older ``70e8ead`` layout
(``share_volume=True``, in_dims 128/198/195, ``fc_p`` active, un-normalised field points).
``infer_head_config`` reads the shapes from a state_dict; what shapes cannot tell (points_factor,
norm_pts) follows the era that the shapes identify.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from dataclasses import field as dc_field
from typing import TYPE_CHECKING, Any, Mapping

from model.config_io import FORBID, ConfigError, before, dump, load

if TYPE_CHECKING:
    import torch


class RenderConfigError(ConfigError):
    """A render-head configuration or state_dict that does not describe a valid model."""


@dataclass(frozen=True)
class DecoderConfig:
    """One decoder MLP (`render_utils/decoders.py`): dims = [hidden] + [hidden]*n_blocks + [out]."""

    __pydantic_config__ = FORBID
    in_dim: int
    out_dim: int
    hidden_size: int = 128
    n_blocks: int = 0
    points_factor: float = 0.0


@dataclass(frozen=True)
class FieldConfig:
    __pydantic_config__ = FORBID
    sdf_decoder: DecoderConfig
    rgb_decoder: DecoderConfig | None = None
    semantic_decoder: DecoderConfig | None = None
    beta_init: float = 0.3
    use_gradient: bool = True
    share_volume: bool = False
    norm_pts: bool = True
    norm_padding: float = 0.1


@dataclass(frozen=True)
class ProjectionConfig:
    """UNet3D-v1m2 (SingleConv "bcr" blocks, transposed-conv upsampling, sum joining)."""

    __pydantic_config__ = FORBID
    in_channels: int = 96
    out_channels: int = 128
    f_maps: tuple[int, ...] = (32, 64, 128, 256)


@dataclass(frozen=True)
class SamplerConfig:
    """NeuSSampler with a UniformSampler start and one PDF upsampling step."""

    __pydantic_config__ = FORBID
    num_samples: int = 96
    num_samples_importance: int = 36
    num_upsample_steps: int = 1
    base_variance: float = 64.0
    train_stratified: bool = True
    single_jitter: bool = False


@dataclass(frozen=True)
class ColliderConfig:
    __pydantic_config__ = FORBID
    near_plane: float = 0.01
    bbox: tuple[float, float, float, float, float, float] = (-0.55, -0.55, -0.55, 0.55, 0.55, 0.55)


@dataclass(frozen=True)
class LossConfig:
    """`SurfaceModel.get_loss` settings; a weight of 0 drops that loss from the dict (as the original)."""

    __pydantic_config__ = FORBID
    sensor_depth_truncation: float = 0.05
    temperature: float = 0.01
    depth_loss: float = 1.0
    rgb_loss: float = 10.0
    semantic_loss: float = 0.1
    free_space_loss: float = 1.0
    sdf_loss: float = 10.0
    eikonal_loss: float = 0.01


@dataclass(frozen=True)
class RenderHeadConfig:
    """Everything below the sparse backbone. ``grid_shape`` is (X, Y, Z) as in the original."""

    __pydantic_config__ = FORBID
    projection: ProjectionConfig = dc_field(default_factory=ProjectionConfig)
    field: FieldConfig = dc_field(default_factory=lambda: head_field_config(128))
    sampler: SamplerConfig = dc_field(default_factory=SamplerConfig)
    collider: ColliderConfig = dc_field(default_factory=ColliderConfig)
    loss: LossConfig = dc_field(default_factory=LossConfig)
    grid_shape: tuple[int, int, int] = (128, 128, 32)
    grid_size: float = 0.02
    val_ray_split: int = 10240
    ray_nsample: int = 256
    padding: float = 0.1

    def __post_init__(self) -> None:
        if len(self.grid_shape) != 3 or min(self.grid_shape) < 1:
            raise RenderConfigError(f"grid_shape must be three positive sizes (X, Y, Z), got {self.grid_shape}")
        if self.val_ray_split < 1 or self.ray_nsample < 1:
            raise RenderConfigError("val_ray_split and ray_nsample must be positive")
        _check_field(self.field, self.projection.out_channels)

    @property
    def bounds(self) -> tuple[float, float]:
        """The ±(0.5 + padding/2) box used by ``mask_at_box`` when building training rays."""
        return -0.5 - self.padding / 2, 0.5 + self.padding / 2

    def to_dict(self) -> dict[str, Any]:
        return dump(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | RenderHeadConfig) -> RenderHeadConfig:
        """From ``to_dict`` output (or a YAML/JSON mapping of the same fields); without ``field``, the HEAD layout
        for the projection's output channels."""
        return load(cls, data, error=RenderConfigError)

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> Any:
        return before(handler, source, _default_field)

    @classmethod
    def from_official(cls, model: Mapping[str, Any]) -> "RenderHeadConfig":
        """From the official ``PonderIndoor-v2`` model dict (e.g. a fixture's model_config.json): its spelling
        (``f_maps`` + ``num_levels``, ``renderer.*``, ``loss.weights``, a scalar ``grid_shape``) and defaults
        translated into our fields, then the typed loader."""
        try:
            proj = model["projection"]
            f_maps = proj.get("f_maps", 32)
            f_maps = [f_maps * 2**k for k in range(proj.get("num_levels", 4))] if isinstance(f_maps, int) else f_maps
            rcfg = model["renderer"]
            fcfg, s, c = rcfg["field"], rcfg["sampler"], rcfg["collider"]
            loss = rcfg.get("loss", {})
            grid_shape = model.get("grid_shape", 64)
            losses = {f.name for f in fields(LossConfig)}
            data = {
                "projection": {"in_channels": proj["in_channels"], "out_channels": proj["out_channels"],
                               "f_maps": f_maps},
                "field": {"sdf_decoder": _official_decoder(fcfg.get("sdf_decoder")),
                          "rgb_decoder": _official_decoder(fcfg.get("rgb_decoder")),
                          "semantic_decoder": _official_decoder(fcfg.get("semantic_decoder")),
                          "beta_init": fcfg.get("beta_init", 0.3), "use_gradient": fcfg.get("use_gradient", True),
                          "share_volume": fcfg.get("share_volume", True), "norm_pts": fcfg.get("norm_pts", False),
                          "norm_padding": fcfg.get("norm_padding", 0.1)},
                "sampler": {"num_samples": s["num_samples"], "num_samples_importance": s["num_samples_importance"],
                            "num_upsample_steps": s["num_upsample_steps"],
                            "base_variance": s.get("base_variance", 64.0),
                            "train_stratified": s.get("train_stratified", True),
                            "single_jitter": s.get("single_jitter", True)},
                "collider": {"near_plane": c["near_plane"], "bbox": c["bbox"]},
                "loss": {"sensor_depth_truncation": loss.get("sensor_depth_truncation", 0.05),
                         "temperature": loss.get("temperature", 0.01),
                         **{k: v for k, v in loss.get("weights", {}).items() if k in losses}},
                "grid_shape": grid_shape if isinstance(grid_shape, (list, tuple)) else [grid_shape] * 3,
                "grid_size": model.get("grid_size", 0.02), "val_ray_split": model.get("val_ray_split", 10240),
                "ray_nsample": model.get("ray_nsample", 128), "padding": model.get("padding", 0.1)}
        except KeyError as exc:
            raise RenderConfigError(f"official model config lacks {exc}") from exc
        return load(cls, data, "official", error=RenderConfigError)


def _official_decoder(d: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """An official decoder dict with the official defaults (hidden 256, 5 blocks, fc_p active)."""
    if d is None:
        return None
    return {"in_dim": d["in_dim"], "out_dim": d["out_dim"], "hidden_size": d.get("hidden_size", 256),
            "n_blocks": d.get("n_blocks", 5), "points_factor": d.get("points_factor", 1.0)}


def _default_field(data: Any) -> Any:
    """A head mapping without ``field`` gets the HEAD layout sized by its projection (not the 128-channel default)."""
    if not isinstance(data, Mapping) or data.get("field"):
        return data
    return {**data, "field": head_field_config(_projection_channels(data))}


def _projection_channels(head: Mapping[str, Any]) -> int:
    """The volume channels of a head mapping's ``projection`` (the default when it is not valid: the head's own
    validation then names the bad field)."""
    proj = head.get("projection", {})
    if isinstance(proj, ProjectionConfig):
        return proj.out_channels
    try:
        return load(ProjectionConfig, proj).out_channels
    except ConfigError:
        return ProjectionConfig.out_channels


@dataclass(frozen=True)
class FieldShortcut:
    """``field: {hidden_size, geo_dim}`` of a YAML render head: the HEAD decoder layout (``head_field_config``)."""

    __pydantic_config__ = FORBID
    hidden_size: int = 128
    geo_dim: int = 64


def expand_field(head: Any, semantic: bool, where: str) -> Any:
    """A render-head mapping whose ``field`` is absent or the shortcut ``{hidden_size, geo_dim}``, with that field
    written out: the HEAD layout for the projection's channels, with a semantic decoder only when ``semantic``.
    A full ``field`` (with ``sdf_decoder``) and anything not a mapping are returned as they are; a bad shortcut
    is a ConfigError naming ``<where>.field``."""
    if not isinstance(head, Mapping):
        return head
    short = head.get("field")
    if isinstance(short, FieldConfig) or (isinstance(short, Mapping) and "sdf_decoder" in short):
        return head
    short = load(FieldShortcut, short or {}, f"{where}.field" if where else "field")
    f = head_field_config(_projection_channels(head), short.geo_dim, short.hidden_size)
    return {**head, "field": f if semantic else replace(f, semantic_decoder=None)}


@dataclass
class RenderSection:
    """The ``render`` section of a ModelConfig (pre-training checkpoints, and models that also render): the head
    and the PonderIndoor-v2 wrapper's options (``model.pretrain``)."""

    __pydantic_config__ = FORBID
    head: RenderHeadConfig
    proj_head: bool = True      # the semantic projection ``proj_head`` (a Linear to the text-embedding width)
    semantic: bool = True       # ``class_embedding`` + ``logit_scale`` present (semantic rendering targets)
    mask_channels: int = 0      # width of the masking token ``mtoken`` (0: no block masking)

    def __post_init__(self) -> None:
        if self.mask_channels < 0:
            raise RenderConfigError(f"render.mask_channels must be >= 0, got {self.mask_channels}")


def head_field_config(volume_channels: int = 128, geo_dim: int = 64, hidden: int = 128) -> FieldConfig:
    """The HEAD indoor configs: half the volume channels to the SDF decoder, fc_p inactive."""
    half = (volume_channels + 1) // 2
    rest = volume_channels - half
    return FieldConfig(
        sdf_decoder=DecoderConfig(half, geo_dim + 1, hidden, 1, 0.0),
        rgb_decoder=DecoderConfig(3 + rest + geo_dim + 3, 3, hidden, 0, 0.0),
        semantic_decoder=DecoderConfig(3 + rest + geo_dim, 512, hidden, 0, 0.0),
        share_volume=False, norm_pts=True)


def legacy_field_config(volume_channels: int = 128, geo_dim: int = 64, hidden: int = 128) -> FieldConfig:
    """The ``70e8ead`` configs (spec §10.3): all channels to every decoder, fc_p(points) added, no point
    normalisation (before commit 6576cc1 the field sampled at 2p-1 like the importance sampler)."""
    return FieldConfig(
        sdf_decoder=DecoderConfig(volume_channels, geo_dim + 1, hidden, 1, 1.0),
        rgb_decoder=DecoderConfig(3 + volume_channels + geo_dim + 3, 3, hidden, 0, 1.0),
        semantic_decoder=DecoderConfig(3 + volume_channels + geo_dim, 512, hidden, 0, 1.0),
        share_volume=True, norm_pts=False)


def _check_field(cfg: FieldConfig, volume_channels: int) -> None:
    sdf_feat = volume_channels if cfg.share_volume else (volume_channels + 1) // 2
    color_feat = volume_channels if cfg.share_volume else volume_channels - sdf_feat
    geo = cfg.sdf_decoder.out_dim - 1
    if cfg.sdf_decoder.in_dim != sdf_feat:
        raise RenderConfigError(f"sdf_decoder.in_dim {cfg.sdf_decoder.in_dim} != {sdf_feat} sampled channels "
                                f"(volume {volume_channels}, share_volume={cfg.share_volume})")
    grad = 3 if cfg.use_gradient else 0
    if cfg.rgb_decoder is not None and cfg.rgb_decoder.in_dim != grad + color_feat + geo + 3:
        raise RenderConfigError(f"rgb_decoder.in_dim {cfg.rgb_decoder.in_dim} != {grad + color_feat + geo + 3}")
    if cfg.semantic_decoder is not None and cfg.semantic_decoder.in_dim != grad + color_feat + geo:
        raise RenderConfigError(f"semantic_decoder.in_dim {cfg.semantic_decoder.in_dim} != {grad + color_feat + geo}")


def _decoder_from_state(sd: Mapping[str, torch.Tensor], prefix: str, points_factor: float) -> DecoderConfig | None:
    if f"{prefix}fc_p.weight" not in sd:
        return None
    lins = sorted(int(k[len(prefix) + 3:].split(".")[0]) for k in sd
                  if k.startswith(f"{prefix}lin") and k.endswith(".weight"))
    if not lins or lins != list(range(len(lins))):
        raise RenderConfigError(f"{prefix}: lin layers are missing or not numbered 0..n")
    return DecoderConfig(in_dim=sd[f"{prefix}fc_c.0.weight"].shape[1],
                         out_dim=sd[f"{prefix}lin{lins[-1]}.weight"].shape[0],
                         hidden_size=sd[f"{prefix}fc_p.weight"].shape[0], n_blocks=len(lins) - 1,
                         points_factor=points_factor)


def infer_head_config(sd: Mapping[str, torch.Tensor], **overrides: Any) -> RenderHeadConfig:
    """Render-head config of a (``module.``-stripped) PonderIndoor-v2 state_dict.

    Reads ``proj_net.*`` (levels, channels) and ``renderer.field.*`` (decoder dims). share_volume comes
    from the SDF decoder's in_dim; use_gradient from the RGB decoder's in_dim. ``overrides`` replace top-level
    fields (grid_shape, val_ray_split, ...), which a state_dict cannot tell.
    """
    p = "proj_net."
    if f"{p}encoders.0.basic_module.batchnorm.weight" not in sd:
        raise RenderConfigError("state_dict has no proj_net.encoders.0 (not a PonderIndoor-v2 checkpoint?)")
    levels = sum(1 for k in sd if k.startswith(f"{p}encoders.") and k.endswith("basic_module.conv.weight"))
    f_maps = tuple(sd[f"{p}encoders.{i}.basic_module.conv.weight"].shape[0] for i in range(levels))
    proj = ProjectionConfig(in_channels=sd[f"{p}encoders.0.basic_module.batchnorm.weight"].shape[0],
                            out_channels=sd[f"{p}final_conv.weight"].shape[0], f_maps=f_maps)
    c = proj.out_channels
    f = "renderer.field."
    sdf_in = sd[f"{f}sdf_decoder.fc_c.0.weight"].shape[1] if f"{f}sdf_decoder.fc_c.0.weight" in sd else None
    if sdf_in == c:
        share, points_factor, norm_pts = True, 1.0, False  # the 70e8ead era
    elif sdf_in == (c + 1) // 2:
        share, points_factor, norm_pts = False, 0.0, True  # HEAD
    else:
        raise RenderConfigError(f"renderer.field.sdf_decoder.fc_c.0 takes {sdf_in} channels; expected {c} "
                                f"(share_volume) or {(c + 1) // 2} for a {c}-channel volume")
    sdf = _decoder_from_state(sd, f"{f}sdf_decoder.", points_factor)
    rgb = _decoder_from_state(sd, f"{f}rgb_decoder.", points_factor)
    sem = _decoder_from_state(sd, f"{f}semantic_decoder.", points_factor)
    color_feat = c if share else c - sdf_in
    use_gradient = True
    if rgb is not None:
        extra = rgb.in_dim - (color_feat + sdf.out_dim - 1 + 3)
        if extra not in (0, 3):
            raise RenderConfigError(f"rgb_decoder in_dim {rgb.in_dim} does not fit a {c}-channel volume")
        use_gradient = extra == 3
    field_cfg = FieldConfig(sdf_decoder=sdf, rgb_decoder=rgb, semantic_decoder=sem, share_volume=share,
                            norm_pts=norm_pts, use_gradient=use_gradient)
    return replace(RenderHeadConfig(projection=proj, field=field_cfg), **overrides)

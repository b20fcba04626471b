"""Request parameters and JSON answers of the API (pydantic models, so they validate and document)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from model.pointcloud.readers import SUPPORTED_FORMATS


class ModelParams(BaseModel):
    """Query parameters of every model route."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str | None = Field(None, max_length=200, description="served model name (default: the server's default)")
    condition: str | None = Field(None, max_length=100,
                                  description="dataset condition for conditioned (PPT) models, e.g. ScanNet")
    format: str | None = Field(None, max_length=20,
                               description="input format (" + ", ".join(SUPPORTED_FORMATS) + ") when neither the "
                                           "Content-Type nor the file name tells it; unknown ones get 415")
    timeout_s: float | None = Field(None, gt=0, le=3600, allow_inf_nan=False,
                                    description="deadline for this request in seconds (capped by the server's)")


class CommonParams(ModelParams):
    """Query parameters of the routes that voxelise the upload at a chosen grid size."""

    grid_size: float | None = Field(None, gt=0, le=10, allow_inf_nan=False,
                                    description="voxel size in metres (default: the model's)")
    filename: str | None = Field(None, max_length=500, description="upload name (its suffix can tell the format)")
    up: Literal["z", "-z", "y", "-y", "x", "-x", "auto"] = Field(
        "z", description="the input's up axis; the model expects z-up metres. The cloud is rotated into z-up before "
                         "voxelisation (X-Ponder-Up-Rotation: the 3x3 row-major rotation applied); per-point answers "
                         "stay in the input's order. auto: estimated from the scan's planes (see README)")
    invalid: Literal["drop", "error"] = Field(
        "drop", description="points with NaN/inf coordinates or normals: drop them from the model's input "
                            "(their features are NaN and labels -1; X-Ponder-Dropped-Points) or refuse (422)")

    def input_options(self):
        from model.prepare import InputOptions

        return InputOptions(up=self.up, invalid=self.invalid)


class FeatureParams(CommonParams):
    output: Literal["per_point", "per_voxel"] = Field(
        "per_point", description="per_point: (N, C) features in input order; per_voxel: (M, C) voxel features "
                                 "+ point_to_voxel (N,) + grid_coord (M, 3)")
    dtype: Literal["float32", "float16"] = Field("float32", description="dtype of the returned features")


class SegmentParams(CommonParams):
    mode: Literal["fast", "precise"] = Field(
        "fast", description="fast: one pass, each point takes its voxel's logits; precise: the official tester "
                            "(13 test-time augmentations x grid fragments covering every point, softmax voted per "
                            "point; logits are then log mean probabilities), 13-40x slower, in-process worker only")
    logits: bool = Field(False, description="also return per-point logits (N, K)")
    dtype: Literal["float32", "float16"] = Field("float32", description="dtype of the returned logits")


class DetectParams(CommonParams):
    score_threshold: float | None = Field(None, ge=0, le=1, allow_inf_nan=False,
                                          description="minimum box score (default: the model's, usually 0.3)")
    iou_threshold: float | None = Field(None, ge=0, le=1, allow_inf_nan=False,
                                        description="per-class non-maximum suppression IoU (default: the model's)")


class RenderParams(ModelParams):
    output: Literal["color", "depth"] = Field(
        "color", description="single-PNG answers: 8-bit RGB colour, or 16-bit depth in millimetres (0 = no hit); "
                             "zip answers always hold both plus float32 depth in metres")
    width: int | None = Field(None, ge=1, le=16384,
                              description="render every camera at this width (intrinsics scaled; height follows "
                                          "the aspect ratio unless given)")
    height: int | None = Field(None, ge=1, le=16384,
                               description="render every camera at this height (intrinsics scaled; width follows "
                                           "the aspect ratio unless given)")
    up: Literal["z", "-z", "y", "-y", "x", "-x", "auto"] = Field(
        "z", description="the scene's up axis (the model expects z-up metres): the cloud is rotated into z-up for the "
                         "model and the cameras stay in the scene's frame (X-Ponder-Up-Rotation: input -> z-up)")
    invalid: Literal["drop", "error"] = Field(
        "drop", description="points with NaN/inf coordinates or normals (the holes of an organised scan): leave them "
                            "out of the scene (X-Ponder-Dropped-Points) or refuse (422)")


class Problem(BaseModel):
    """application/problem+json error body."""

    type: str
    title: str
    status: int
    detail: str
    request_id: str | None = None


class ModelEntry(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    name: str
    kind: str
    conditions: list[str]
    default_condition: str | None
    classes: dict[str, list[str]]
    feature_dim: int
    grid_size: float
    input_features: list[str]
    version: str
    can_segment: bool
    capabilities: list[str] = Field(description="routes this model answers: features, segment, detect, render")
    default: bool


class ImageModelEntry(BaseModel):
    """A model that answers posted images (multipart ``image_<id>`` parts + ``cameras``), not point clouds."""

    model_config = ConfigDict(protected_namespaces=())

    name: str = Field(description="the ?model= value that names it on its routes (optional there: each route has "
                                  "one image model)")
    kind: Literal["images", "images-segment"] = Field(
        description="images: features and novel views of the lifted scene; images-segment: labels per voxel and "
                    "per input pixel")
    class_names: list[str] = Field(description="segmentation classes (images-segment; label i is class_names[i], "
                                               "-1 empty space); empty for images")
    feature_dim: int | None = Field(description="channels of the per-voxel features")
    grid_shape: list[int] = Field(description="the lifted grid X, Y, Z (its voxels are limited by "
                                              "PONDER_IMAGES_MAX_VOLUME_VOXELS)")
    capabilities: list[str] = Field(description="routes that run it on posted images: features, render (images); "
                                                "segment (images-segment)")


class ModelList(BaseModel):
    models: list[ModelEntry]
    default_model: str | None
    worker: str
    image_models: list[ImageModelEntry] = Field(
        default_factory=list, description="models for posted images (in-process worker only; empty with Triton)")


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    ready: bool
    detail: str
    models: list[str]
    worker: str
    queue_depth: int


class _SceneAnswer(BaseModel):
    """The request facts every JSON answer about an uploaded scene starts with (more keys are allowed)."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    model: str
    condition: str | None
    num_points: int


class _VoxelAnswer(_SceneAnswer):
    num_voxels: int
    grid_size: float


class FeaturesJSON(_VoxelAnswer):
    """JSON answer of /v1/features (arrays as nested lists; ``*_shape``/``*_dtype`` describe each)."""

    output: str
    features: list


class SegmentJSON(_VoxelAnswer):
    """JSON answer of /v1/segment."""

    class_names: list[str]
    labels: list[int]


class Detection(BaseModel):
    label: str
    label_id: int
    score: float
    center: list[float] = Field(description="box centre x, y, z in the input's world frame (metres)")
    size: list[float] = Field(description="full edge lengths dx, dy, dz along the box's own axes (metres)")
    yaw: float = Field(description="radians about +z, counter-clockwise seen from above")
    corners: list[list[float]] = Field(description="(8, 3): bottom face then top face, counter-clockwise")


class DetectJSON(_SceneAnswer):
    """JSON answer of /v1/detect: the ``ponder detect`` document (format ponder-detections/1) and request facts."""

    grid_size: float
    format: str
    source: str | None
    box_convention: str
    class_names: list[str]
    detections: list[Detection]

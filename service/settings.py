"""Service settings: one pydantic-settings model read from keyword overrides, ``PONDER_*`` environment
variables and an optional YAML/JSON config file, in that order of precedence.

Every field below is also an environment variable: ``PONDER_`` + the field name in upper case
(``max_batch`` -> ``PONDER_MAX_BATCH``). List fields accept JSON (``'["a","b"]'``) or a comma-separated
string (``a,b``). The config file is named by the ``config_file`` field (``PONDER_CONFIG_FILE``); it holds
a mapping of field names to values (``.json`` as JSON, anything else as YAML).

| setting | default | meaning |
|---|---|---|
| checkpoint | None | one checkpoint to serve (named by its file/folder stem); None + no models_dir = bundled default |
| models_dir | None | serve every checkpoint file/folder in this directory, each named by its stem |
| empty_models_dir | "error" | models_dir missing or holding no checkpoint: "error" (refuse to start) or "default" (serve the bundled default model and log it; the images set this) |
| default_model | None | model used when a request names none (default: the first name in sorted order) |
| device | "cpu" | torch device for the in-process worker |
| trust_checkpoint | False | allow full unpickling of checkpoints (only for files you made yourself) |
| backend | "auto" | encoder of the in-process worker: "auto" (the fastest exact one for the device: the torch engine), "torch" (the spconv-free engine: valid pairs on CPU, gather on CUDA), "spconv" (the model's spconv layers), "onnxruntime" (the exported gather graph, CPU/CUDA providers) or "tensorrt" (onnxruntime's TensorRT provider) |
| torch_threads | None | torch intra-op threads of the fast lane's model thread, which also loads the models (None = torch's default: every core) |
| long_torch_threads | None | torch intra-op threads of a long-lane job (None = the fast lane's count). Each long job runs on a thread of its own that ends with it, so its OpenMP team does not outlive it (a lasting second team slowed every later fast-lane forward 1.65x here: bench/service_lanes.py) |
| worker | "inprocess" | "inprocess" (models in the gateway process) or "triton" (remote Triton servers) |
| triton_urls | ["127.0.0.1:8101"] | Triton endpoints (host:port), used round-robin |
| triton_protocol | "grpc" | "grpc" or "http" |
| triton_retries | 3 | retries per request on transient Triton errors (with exponential backoff) |
| triton_backoff_s | 0.05 | first retry delay; doubles per retry |
| triton_startup_wait_s | 5.0 | how long startup waits for a Triton endpoint to list its models before the gateway listens (then it keeps trying in the background: /healthz answers, /readyz is 503 with the last error until models are listed) |
| breaker_failures | 5 | consecutive failures that open an endpoint's circuit breaker |
| breaker_reset_s | 10.0 | how long an open breaker refuses calls before one trial call |
| max_upload_bytes | 512 MiB | request bodies above this are refused with 413 while they are read |
| upload_idle_timeout_s | 30.0 | an upload that sends no bytes for this long is refused with 408 (a stalled or trickling client holds no lane place meanwhile: places are taken once the body is in) |
| upload_min_bytes_per_s | 1024.0 | after its first upload_idle_timeout_s, an upload whose average rate falls below this is refused with 408 (a client trickling a byte at a time would otherwise hold its connection until the request deadline); 0 turns it off |
| max_inflight_upload_bytes | 2 GiB | request body bytes all requests in flight may hold together (counted as they arrive, given back when answered); an upload whose next bytes would pass it gets 503 + Retry-After. Bounds the memory of many concurrent uploads, which take no lane place until their body is in |
| max_points | 5_000_000 | clouds with more points are refused with 413 (from the file header, before decoding) |
| max_voxels | 1_500_000 | most voxels of one scene at the model's grid, counted before normals, kernel maps and the encoder (their memory grows with it: ~3 KB per voxel for the published-size encoder); more get 413 |
| max_decoded_bytes | 2 GiB | memory budget for decoding one upload (arrays sized from its header, RGB-D fusion from its image sizes); above it 413 before allocating |
| max_json_values | 2_000_000 | answers with more numbers are refused in JSON (406: ask for NPY/NPZ/Arrow) |
| max_render_pixels | 4_194_304 | /v1/render: requests whose cameras add up to more pixels are refused with 413 |
| render_chunk | 4096 | /v1/render: rays rendered at a time; bounds memory (on a GPU, 65536 rendered 2.3x faster for 3.5 GiB: bench/render_gpu.py) |
| request_timeout_s | 120.0 | deadline for one request (decode + queue + inference); 504 after it |
| queue_size | 32 | fast lane (features, segment): requests admitted beyond those running; more get 503 + Retry-After at once, before their upload is read (a place is taken once the upload is in) |
| long_queue_size | 4 | long lane (render, precise segment, detect): the same bound for long jobs, which have their own queue and threads |
| long_concurrency | 1 | long lane: model threads running long jobs at once (each job's cancel token is checked per chunk) |
| drain_s | 10.0 | on SIGTERM: how long in-flight requests may finish before their jobs are cancelled and the server exits |
| max_batch | 4 | requests merged into one forward pass |
| max_wait_ms | 5.0 | how long the batching loop waits to fill a batch |
| max_batch_voxels | 1_500_000 | voxels of one batched forward: a request that would take a batch past this waits for the next one (a scene alone always runs), so a batch's encoder memory stays that of one largest scene |
| preprocess_threads | 2 | threads that decode uploads and voxelise (never the event loop) |
| api_keys | [] | accepted API keys (``X-API-Key`` or ``Authorization: Bearer``); empty = no auth |
| allow_anonymous_public | False | `ponder serve` on a non-loopback address without api_keys refuses to start unless this is true (compose sets it: it publishes the port on the host's 127.0.0.1 only) |
| rate_limit_per_s | 0.0 | token-bucket refill rate per API key (per client address without keys); 0 = off |
| rate_limit_burst | 20 | token-bucket capacity |
| depth_scale | 1000.0 | RGB-D: depth PNG units per metre (1000 = millimetres) |
| rgbd_max_depth_m | 10.0 | RGB-D: depths beyond this are dropped |
| rgbd_voxel_m | 0.01 | RGB-D: voxel size of the fused cloud's downsampling |
| rgbd_max_pixels | 3_145_728 | RGB-D: most depth pixels of one upload (ten 640x480 views), read from the PNG headers; more get 413 before decoding |
| images_checkpoint | None | image model folder (posted images on /v1/features and /v1/render); None = the bundled model/default_model/images |
| images_segment_checkpoint | None | image segmentation model folder (posted images on /v1/segment); None = the bundled model/default_model/images-segment |
| images_max_views | 32 | images: most views (image parts, or cameras listed) of one request; more get 413 |
| images_max_view_pixels | 1_048_576 | images: most pixels of one view (1024 x 1024), read from its header; more get 413 before decoding |
| images_max_total_pixels | 8_388_608 | images: most pixels of all views of one request; more get 413 before decoding |
| images_max_volume_voxels | 2_097_152 | images: most voxels (X·Y·Z) of the image model's lifted grid; more get 413 |
| images_max_cameras_bytes | 4 MiB | images: largest 'cameras' / 'novel' part; larger gets 413 |
| log_level | "INFO" | level of the structured JSON logs |
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, PrivateAttr, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

StrList = Annotated[list[str], NoDecode]


class ServiceSettings(BaseSettings):
    """All knobs of the gateway and its workers (see the module docstring for the table)."""

    model_config = SettingsConfigDict(env_prefix="PONDER_", extra="forbid", protected_namespaces=())

    config_file: Path | None = None

    checkpoint: Path | None = None
    models_dir: Path | None = None
    empty_models_dir: Literal["error", "default"] = "error"
    default_model: str | None = None
    device: str = "cpu"
    trust_checkpoint: bool = False
    backend: Literal["auto", "spconv", "torch", "onnxruntime", "tensorrt"] = "auto"
    torch_threads: int | None = Field(default=None, ge=1)
    long_torch_threads: int | None = Field(default=None, ge=1)

    worker: Literal["inprocess", "triton"] = "inprocess"
    triton_urls: StrList = Field(default_factory=lambda: ["127.0.0.1:8101"])
    triton_protocol: Literal["grpc", "http"] = "grpc"
    triton_retries: int = Field(default=3, ge=0)
    triton_backoff_s: float = Field(default=0.05, ge=0)
    triton_startup_wait_s: float = Field(default=5.0, ge=0)
    breaker_failures: int = Field(default=5, ge=1)
    breaker_reset_s: float = Field(default=10.0, gt=0)

    max_upload_bytes: int = Field(default=512 * 1024 * 1024, ge=1)
    upload_idle_timeout_s: float = Field(default=30.0, gt=0)
    upload_min_bytes_per_s: float = Field(default=1024.0, ge=0)
    max_inflight_upload_bytes: int = Field(default=2 << 30, ge=1)
    max_points: int = Field(default=5_000_000, ge=1)
    max_voxels: int = Field(default=1_500_000, ge=1)
    max_decoded_bytes: int = Field(default=2 << 30, ge=1)
    max_json_values: int = Field(default=2_000_000, ge=1)
    max_render_pixels: int = Field(default=4_194_304, ge=1)
    render_chunk: int = Field(default=4096, ge=1)
    request_timeout_s: float = Field(default=120.0, gt=0)
    queue_size: int = Field(default=32, ge=1)
    long_queue_size: int = Field(default=4, ge=0)
    long_concurrency: int = Field(default=1, ge=1)
    drain_s: float = Field(default=10.0, ge=0)
    max_batch: int = Field(default=4, ge=1)
    max_wait_ms: float = Field(default=5.0, ge=0)
    max_batch_voxels: int = Field(default=1_500_000, ge=1)
    preprocess_threads: int = Field(default=2, ge=1)

    api_keys: StrList = Field(default_factory=list)
    allow_anonymous_public: bool = False
    rate_limit_per_s: float = Field(default=0.0, ge=0)
    rate_limit_burst: int = Field(default=20, ge=1)

    depth_scale: float = Field(default=1000.0, gt=0)
    rgbd_max_depth_m: float = Field(default=10.0, gt=0)
    rgbd_voxel_m: float = Field(default=0.01, gt=0)
    rgbd_max_pixels: int = Field(default=3 << 20, ge=1)

    images_checkpoint: Path | None = None
    images_segment_checkpoint: Path | None = None
    images_max_views: int = Field(default=32, ge=2)
    images_max_view_pixels: int = Field(default=1 << 20, ge=1)
    images_max_total_pixels: int = Field(default=8 << 20, ge=1)
    images_max_volume_voxels: int = Field(default=1 << 21, ge=1)
    images_max_cameras_bytes: int = Field(default=4 << 20, ge=1)

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    _fallback_note: str | None = PrivateAttr(default=None)  # why the default model replaced models_dir

    @model_validator(mode="after")
    def _default_for_empty_models_dir(self) -> "ServiceSettings":
        """``empty_models_dir="default"``: a models folder that is missing or holds no checkpoint (an empty
        mount) means the bundled default model, as if none was given; ``fallback_note`` says so."""
        if self.empty_models_dir == "default" and self.models_dir is not None and self.checkpoint is None:
            from service.workers.loading import holds_checkpoints

            if not holds_checkpoints(self.models_dir):
                self._fallback_note = (f"models directory {self.models_dir} is missing or holds no checkpoint: "
                                      "serving the bundled default model")
                self.models_dir = None
        return self

    @model_validator(mode="after")
    def _one_upload_fits_the_inflight_budget(self) -> "ServiceSettings":
        if self.max_inflight_upload_bytes < self.max_upload_bytes:
            raise ValueError(f"max_inflight_upload_bytes ({self.max_inflight_upload_bytes}) must be at least "
                             f"max_upload_bytes ({self.max_upload_bytes}): a largest upload would never fit")
        return self

    @property
    def fallback_note(self) -> str | None:
        """Set when ``empty_models_dir="default"`` replaced an empty models folder by the bundled default model."""
        return self._fallback_note

    @field_validator("triton_urls", "api_keys", mode="before")
    @classmethod
    def _split_list(cls, value: Any) -> Any:
        """Accept JSON lists and comma-separated strings from the environment."""
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @field_validator("triton_urls")
    @classmethod
    def _host_and_port(cls, urls: list[str]) -> list[str]:
        """Each endpoint as tritonclient takes it, ``host:port``: a URL scheme or a missing port would otherwise
        surface as 30 s of silent connection attempts at startup."""
        for url in urls:
            if "://" in url:
                raise ValueError(f"Triton endpoint {url!r}: give host:port without a scheme "
                                 f"(e.g. {url.split('://', 1)[1].rstrip('/')!r})")
            host, sep, port = url.rpartition(":")
            if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
                raise ValueError(f"Triton endpoint {url!r}: expected host:port with a port 1-65535 (the worker's gRPC "
                                 "port, 8101 by default, or its HTTP port with PONDER_TRITON_PROTOCOL=http)")
        return urls

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Precedence: keyword overrides > environment > config file > defaults.
        return (init_settings, env_settings, _ConfigFileSource(settings_cls, init_settings))


class _ConfigFileSource(PydanticBaseSettingsSource):
    """Reads the mapping in ``config_file`` (given as a keyword or as ``PONDER_CONFIG_FILE``)."""

    def __init__(self, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource) -> None:
        super().__init__(settings_cls)
        path = getattr(init_settings, "init_kwargs", {}).get("config_file") or os.environ.get("PONDER_CONFIG_FILE")
        self._values = read_config_file(Path(path)) if path else {}

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self._values.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._values)


def read_config_file(path: Path) -> dict[str, Any]:
    """A settings mapping from a JSON or YAML file; a clear error when it is missing or malformed."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ValueError(f"config file {path}: cannot read it ({exc.strerror})") from exc
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ValueError(f"config file {path}: not valid {path.suffix.lstrip('.') or 'YAML'}: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path}: expected a mapping of setting names to values")
    return {str(key).lower(): value for key, value in data.items()}


def settings_problems(exc: Exception) -> str:
    """A settings ValidationError in the words an operator used: each field as its environment variable (the
    same key in a --config file), the problem and the value given, on one line; other errors as they are."""
    from pydantic import ValidationError

    if not isinstance(exc, ValidationError):
        return " ".join(str(exc).split())
    parts = []
    for error in exc.errors():
        field = ".".join(str(part) for part in error.get("loc", ()))
        name = f"PONDER_{field.upper()} ({field})" if field else "settings"
        value = f" (got {error['input']!r})" if "input" in error and not isinstance(error["input"], dict) else ""
        parts.append(f"{name}: {error.get('msg', 'invalid')}{value}")
    return "; ".join(parts)

"""The image models of one app and the running of a posted-images request (``service.images``): which model
folders are served and under which names (what ``GET /v1/models`` lists as ``image_models``), loading them on
first use on the model thread, and one request's way from the upload to a ModelJob on the in-process worker's
long lane, under its deadline and cancel token, named after the image model it runs.

Torch-free at import (the slim gateway): the model code is imported when a job first runs."""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from starlette.requests import Request

from service.errors import ApiError
from service.image_upload import prepare_views, read_image_upload
from service.workers.base import LONG, WorkerInputError

if TYPE_CHECKING:
    from service.settings import ServiceSettings

LOG = logging.getLogger("service.images")
BUNDLED = Path(__file__).resolve().parent.parent / "model" / "default_model"
# slot -> (bundled folder, setting, what it is, the routes that run it on posted images)
SLOTS = {"render": ("images", "PONDER_IMAGES_CHECKPOINT", "image model", ("features", "render")),
         "segment": ("images-segment", "PONDER_IMAGES_SEGMENT_CHECKPOINT", "image segmentation model", ("segment",))}
KIND_SEGMENT = "image-segment"  # model.images.segment.KIND_SEGMENT, restated: that module imports torch (a test compares)


@dataclass(frozen=True)
class ImageModelInfo:
    """What ``/v1/models`` says of a served image model, read from its config.json (no weights loaded)."""

    name: str
    kind: str                          # "images" or "images-segment"
    class_names: tuple[str, ...]       # segmentation classes; () for an image model
    feature_dim: int | None            # channels of the per-voxel features
    grid_shape: tuple[int, int, int]   # the lifted grid X, Y, Z
    capabilities: tuple[str, ...]      # routes that run it on posted images


def read_config(path: Path) -> dict:
    doc = json.loads((path / "config.json").read_text())
    if not isinstance(doc, dict):
        raise ValueError(f"{path / 'config.json'}: not a JSON object")
    return doc


def config_grid(doc: dict) -> tuple[int, int, int]:
    render = doc.get("trunk", doc).get("render", {})
    return tuple(int(g) for g in render.get("grid_shape", (0, 0, 0)))  # type: ignore[return-value]


class ImageModels:
    """The image models of one app (``ServiceSettings.images_*``), loaded on first use (on the model thread)
    and kept. ``settings`` also holds the image limits (``images_max_*``)."""

    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._loaded: dict[Path, Any] = {}
        self._described: dict[Path, tuple | None] = {}  # per folder, from config.json (never waits for a load)
        self._describe_lock = threading.Lock()

    def path(self, kind: str) -> Path:
        """The model folder for ``kind`` ("render" or "segment"); 422 when none is configured or bundled."""
        bundled, env, what, _ = SLOTS[kind]
        given = self.settings.images_checkpoint if kind == "render" else self.settings.images_segment_checkpoint
        path = given or BUNDLED / bundled
        if not (path / "config.json").is_file():
            raise ApiError(422, f"no {what} is served (set {env} to a model folder"
                                + (f"; {path} holds none)" if given else ")"))
        return path

    @staticmethod
    def name(path: Path) -> str:
        return f"default-{path.name}" if path.parent == BUNDLED else path.name

    def get(self, path: Path, device: str) -> Any:
        with self._lock:
            if path not in self._loaded:
                from model.images.checkpoint import load_image_model
                from model.images.segment import is_image_segment_model, load_image_segment_model

                load = load_image_segment_model if is_image_segment_model(path) else load_image_model
                try:
                    self._loaded[path] = load(path, device)
                except (OSError, ValueError) as exc:  # a broken model folder: the server's fault, said plainly
                    raise ApiError(503, f"the image model {path} could not be loaded: {exc}",
                                   headers={"Retry-After": "30"}) from exc
            return self._loaded[path]

    def served(self) -> list[ImageModelInfo]:
        """The image models a request can use, one entry per folder (a folder in both slots answers the routes
        of both); a folder that is missing is left out, one whose config.json is unreadable too (logged once)."""
        routes: dict[Path, tuple[str, ...]] = {}
        for kind in SLOTS:
            try:
                path = self.path(kind)
            except ApiError:
                continue
            routes[path] = routes.get(path, ()) + SLOTS[kind][3]
        infos = []
        for path, capabilities in routes.items():
            described = self._describe(path)
            if described is not None:
                infos.append(ImageModelInfo(self.name(path), *described, capabilities=capabilities))
        return infos

    def grid(self, path: Path) -> tuple[int, int, int]:
        """The lifted grid of a served model folder (from its config.json, read once with ``_describe``);
        503 when that file is unreadable, as for a folder whose weights do not load."""
        described = self._describe(path)
        if described is None:
            raise ApiError(503, f"the image model {path} could not be loaded: its config.json is unreadable",
                           headers={"Retry-After": "30"})
        return described[3]

    def _describe(self, path: Path) -> tuple | None:
        """(kind, class names, feature dim, grid) from the folder's config.json, read once."""
        with self._describe_lock:
            if path not in self._described:
                try:
                    doc = read_config(path)
                    segment = doc.get("kind") == KIND_SEGMENT
                    names = doc.get("class_names") if segment else None
                    dim = doc.get("trunk", doc).get("render", {}).get("projection", {}).get("out_channels")
                    self._described[path] = ("images-segment" if segment else "images",
                                             tuple(str(n) for n in names) if isinstance(names, list) else (),
                                             int(dim) if isinstance(dim, int) else None, config_grid(doc))
                except (OSError, ValueError, AttributeError, TypeError) as exc:
                    LOG.warning("image model %s is not listed: its config.json is unreadable (%s)", path, exc)
                    self._described[path] = None
            return self._described[path]


@dataclass
class Prepared:
    path: Path      # the model folder
    name: str       # its served name
    posed: Any      # model.images.PosedImages, checked and decoded
    bounds: Any     # (2, 3) metres or None (estimated from the frusta by the model code)
    novel: Any      # render cameras (resized, within the pixel limit) or None


async def prepare(request: Request, pipeline, admission, models: ImageModels, kind: str, model_param: str | None,
                  novel_size: tuple[int | None, int | None, int] | None = None) -> Prepared:
    """Read, check and decode the upload (the pool). ``novel_size`` (width, height, max pixels): a render
    request, whose 'novel' cameras are resized and counted here, before any model work."""
    if not pipeline.worker.runs_model_jobs:
        raise ApiError(501, f"images are not served by the {pipeline.worker.kind} worker: the image branch needs the "
                            "in-process worker (PONDER_WORKER=inprocess)")
    path = models.path(kind)
    name = models.name(path)
    if model_param is not None and model_param != name:
        raise ApiError(404, f"unknown image model {model_param!r}; images are served by {name!r}")
    upload = await read_image_upload(request, models.settings, novel_size is not None)
    admission.watch(request)
    grid = await pipeline.in_pool(models.grid, path)  # config.json read once per folder
    posed, bounds, novel = await pipeline.in_pool(prepare_views, upload, models.settings, grid)
    if novel_size is not None:
        from service.routers.render import resized_cameras

        width, height, limit = novel_size
        novel = resized_cameras(novel, width, height, "novel")
        pixels = sum(c.width * c.height for c in novel)
        if pixels > limit:
            raise ApiError(413, f"the novel cameras add up to {pixels} pixels, over the limit of {limit} "
                                "(PONDER_MAX_RENDER_PIXELS)")
    return Prepared(path, name, posed, bounds, novel)


async def run_job(pipeline, admission, models: ImageModels, prepared: Prepared,
                  work: Callable[[Any, Any, Any, Any], Any], what: str, admitted_long: bool = False) -> Any:
    """``work(model, views, bounds, novel)`` as a job on the long lane under the request's deadline and cancel
    token, named after the image model (logs; its own one-at-a-time lock). A request admitted to the fast lane
    (features, segment) takes its own place in the long lane here (503 + Retry-After when it is full);
    ``admitted_long``: the request's admission is that place (render)."""
    from service.workers.inprocess import StandaloneJob  # only reached with the in-process worker (``prepare``)

    device = pipeline.settings.device

    def job(_none: None) -> Any:
        from model.images.errors import ImageInputError

        try:
            return work(models.get(prepared.path, device), prepared.posed, prepared.bounds, prepared.novel)
        except ImageInputError as exc:
            raise WorkerInputError(str(exc)) from exc

    ticket = admission.ticket if admitted_long else pipeline.worker.admit(LONG)
    try:
        return await pipeline.worker.call(StandaloneJob(prepared.name, job, what, cancel=admission.token,
                                                        ticket=ticket))
    finally:
        if not admitted_long:
            ticket.release()

"""The request pipeline shared by every model route: admission check (503 at once when the worker's lane is
full, before the upload is even read) -> read the upload -> a place in the lane -> decode (thread pool) ->
limits -> voxelise (thread pool) -> worker (queue + batched forward pass), all under the request's deadline, whose
``model.cancel.CancelToken`` travels with the job so the model thread stops too. Every bad-input case ends
here as an ApiError with a message; the event loop only awaits."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import numpy as np
from starlette.requests import ClientDisconnect, Request

from model.cancel import CancelToken, Cancelled
from model.pointcloud.cloud import PointCloud, PointCloudError, PointCloudTooLarge
from model.pointcloud.readers import ReadLimits, read_point_cloud
from model.pointcloud.voxelize import VoxelizedCloud, count_voxels
from model.prepare import InputOptions, PreparedCloud, invalid_rows, prepare, prepare_cloud
from service.errors import ApiError
from service.metrics import ServiceMetrics
from service.rgbd import (RGBDError, RGBDView, check_image_budget, decode_color, decode_depth, fuse_views,
                          parse_cameras)
from service.settings import ServiceSettings
from service.uploads import CloudUpload, RGBDUpload, discard_body
from service.workers.base import (FAST, SHUTTING_DOWN, EncodeJob, EncodeOutput, ModelCard, Ticket, Worker, WorkerBusy,
                                  WorkerFailed, WorkerInputError, WorkerUnavailable, WorkerUnsupported)

LOG = logging.getLogger("service.pipeline")
DISCONNECT_POLL_S = 0.25


@dataclass
class Admission:
    """A request's deadline/cancel flag (``token``) and, once its body has been read, its place in a lane
    (``ticket``) until the answer. A lane place is for work, not for an upload in progress: a client that
    trickles its body, or sends none, holds no place (a full lane is still refused before the upload is read)."""

    token: CancelToken
    _admit: Callable[[], Ticket]
    _task: asyncio.Task | None = None
    ticket: Ticket | None = None
    _watcher: asyncio.Task | None = None
    disconnected: bool = False

    def watch(self, request: Request) -> None:
        """Call once the body has been read: takes the lane place (WorkerBusy, a 503, when the lane filled up
        during the upload) and starts noticing a client that leaves."""
        if self.ticket is None:
            self.ticket = self._admit()
        if self._watcher is None and self._task is not None:
            self._watcher = asyncio.create_task(self._watch(request))

    async def _watch(self, request: Request) -> None:
        while not self.token.cancelled:
            await asyncio.sleep(DISCONNECT_POLL_S)
            if await request.is_disconnected():
                self.disconnected = True
                self.token.cancel("the client disconnected")
                assert self._task is not None
                self._task.cancel()
                return

    def close(self) -> None:
        self.token.cancel("the request ended")  # a job still queued is skipped; a running one stops
        if self.ticket is not None:
            self.ticket.release()
        if self._watcher is not None:
            self._watcher.cancel()


@dataclass
class Processed:
    """A request's model output with everything needed to shape the answer."""

    card: ModelCard
    condition: str | None
    prepared: PreparedCloud
    voxels: VoxelizedCloud
    output: EncodeOutput
    rgbd_coord: np.ndarray | None = None  # the fused cloud of an RGB-D upload (input frame), else None

    @property
    def num_points(self) -> int:
        """Points the model saw (the valid rows)."""
        return self.voxels.num_points

    @property
    def filled(self) -> list[str]:
        """Input fields the server had to fill in."""
        return list(self.prepared.filled)


class Pipeline:
    def __init__(self, settings: ServiceSettings, worker: Worker, metrics: ServiceMetrics) -> None:
        self.settings = settings
        self.worker = worker
        self.metrics = metrics
        self._pool = ThreadPoolExecutor(max_workers=settings.preprocess_threads, thread_name_prefix="ponder-prep")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def in_pool(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` in the preprocessing pool (never on the event loop), with the request's log context."""
        ctx = contextvars.copy_context()  # keeps the request id in log lines written by the thread
        return await asyncio.get_running_loop().run_in_executor(self._pool, ctx.run, fn, *args)


    def card(self, model: str | None) -> ModelCard:
        """The model a request names (404 naming the served ones), or the default model."""
        cards = self.worker.models()
        if not cards:
            raise ApiError(503, "no model is loaded yet; retry shortly", headers={"Retry-After": "2"})
        name = model or self.settings.default_model or next(iter(cards))
        if name not in cards:
            raise ApiError(404, f"unknown model {name!r}; served models: {', '.join(cards)}")
        return cards[name]

    @staticmethod
    def resolve_condition(card: ModelCard, condition: str | None) -> str | None:
        try:
            return card.resolve_condition(condition)
        except ValueError as exc:
            raise ApiError(422, str(exc)) from exc

    def timeout_for(self, requested: float | None) -> float:
        limit = self.settings.request_timeout_s
        return min(requested, limit) if requested else limit

    @asynccontextmanager
    async def deadline(self, timeout_s: float, lane: str = FAST, request: Request | None = None
                       ) -> AsyncIterator[Admission]:
        """Refuse the request at once when ``lane`` is full (503 + Retry-After: the upload of ``request`` is then
        read and dropped, never decoded), else run the body within ``timeout_s`` (504 after it; the place in the
        lane is taken by ``Admission.watch`` once the upload is read) and turn worker failures and a client that
        leaves mid-upload into ApiErrors. The admission's token is cancelled and its place released when the
        body ends, however it ends."""
        admission: Admission | None = None
        try:
            try:
                self.worker.check_admission(lane)
            except WorkerBusy:
                if request is not None:
                    await discard_body(request)
                raise
            admission = Admission(CancelToken.after(timeout_s), partial(self.worker.admit, lane),
                                  asyncio.current_task())
            async with asyncio.timeout(timeout_s):
                yield admission
        except TimeoutError as exc:
            raise ApiError(504, f"the request did not finish within {timeout_s:g} s "
                                f"(PONDER_REQUEST_TIMEOUT_S or ?timeout_s=)") from exc
        except asyncio.CancelledError:
            if admission is None or not admission.disconnected:
                raise
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            raise ApiError(499, "the client disconnected before the answer", title="Client Closed Request")
        except Cancelled as exc:
            if exc.reason.startswith(SHUTTING_DOWN):
                raise ApiError(503, exc.reason, headers={"Retry-After": "5"}) from exc
            raise ApiError(504, f"the request did not finish within {timeout_s:g} s ({exc.reason})") from exc
        except ClientDisconnect as exc:
            raise ApiError(499, "the client disconnected during the upload", title="Client Closed Request") from exc
        except WorkerBusy as exc:
            raise ApiError(503, str(exc), headers={"Retry-After": str(exc.retry_after)}) from exc
        except WorkerUnavailable as exc:
            raise ApiError(503, f"the model server is unavailable: {exc}", headers={"Retry-After": "5"}) from exc
        except WorkerFailed as exc:
            raise ApiError(502, f"the model server failed: {exc}") from exc
        except WorkerInputError as exc:
            raise ApiError(422, str(exc)) from exc
        except WorkerUnsupported as exc:
            raise ApiError(501, str(exc)) from exc
        finally:
            if admission is not None:
                admission.close()

    async def run(self, upload: CloudUpload | RGBDUpload, card: ModelCard, condition: str | None,
                  grid_size: float | None, want_logits: bool, admission: Admission,
                  options: InputOptions | None = None) -> Processed:
        """Decode, prepare (model.prepare: invalid rows, up axis, voxelise) and encode one upload, under
        ``admission`` (the caller's deadline block)."""
        start = time.perf_counter()
        cloud = await self.in_pool(self._decode, upload, grid_size or card.info.grid_size, True)
        prepared, voxels = await self.in_pool(self._prepare, cloud, card, grid_size, options)
        self.metrics.preprocess_latency.observe(time.perf_counter() - start)
        job = EncodeJob(model=card.info.name, voxels=voxels, condition=condition, want_logits=want_logits,
                        cancel=admission.token, ticket=admission.ticket)
        output = await self.worker.run(job)
        return Processed(card=card, condition=condition, prepared=prepared, voxels=voxels, output=output,
                         rgbd_coord=cloud.coord if isinstance(upload, RGBDUpload) else None)

    async def decode_prepared(self, upload: CloudUpload | RGBDUpload, card: ModelCard, grid_size: float | None,
                              options: InputOptions | None = None) -> PreparedCloud:
        """For model jobs that voxelise themselves (precise segmentation, detection): the cloud through steps 1-3
        of model.prepare (valid rows, z-up, missing colours/normals filled here, not on the model thread)."""
        start = time.perf_counter()
        cloud = await self.in_pool(self._decode, upload, grid_size or card.info.grid_size, True)
        prepared = await self.in_pool(self._prepare_points, cloud, card, grid_size, options)
        self.metrics.preprocess_latency.observe(time.perf_counter() - start)
        return prepared

    def _decode(self, upload: CloudUpload | RGBDUpload, grid_size: float | None = None,
                keep_invalid: bool = False) -> PointCloud:
        """Bytes → PointCloud under the size limits; with ``grid_size`` (the model's grid) also the voxel limit,
        checked before any step whose cost grows with the scene (normals, kernel maps, the encoder).
        ``keep_invalid`` keeps NaN/inf rows for model.prepare to drop (or refuse, per the request)."""
        try:
            cloud = (self._fuse(upload, grid_size) if isinstance(upload, RGBDUpload)
                     else self._read(upload, keep_invalid))
        except PointCloudTooLarge as exc:  # sized from the header, refused before allocating
            raise ApiError(413, f"{exc} (PONDER_MAX_POINTS, PONDER_MAX_DECODED_BYTES)") from exc
        except MemoryError as exc:
            raise ApiError(413, "decoding the upload ran out of memory; send a smaller input") from exc
        except (PointCloudError, RGBDError) as exc:
            raise ApiError(422, str(exc)) from exc
        if len(cloud) > self.settings.max_points:
            raise ApiError(413, f"{cloud.source}: {len(cloud)} points exceed the limit of "
                                f"{self.settings.max_points} (PONDER_MAX_POINTS); split the scene")
        if grid_size is not None and not isinstance(upload, RGBDUpload):  # fusion checked before its normals
            bad = invalid_rows(cloud) if keep_invalid else None
            self._check_voxels(cloud.coord if bad is None or not bad.any() else cloud.coord[~bad], grid_size,
                               cloud.source)
        LOG.info("decoded the upload: %d points", len(cloud), extra={"points": len(cloud)})
        return cloud

    def _check_voxels(self, coord: np.ndarray, grid_size: float, source: str) -> None:
        voxels = count_voxels(coord, grid_size)
        if voxels > self.settings.max_voxels:
            raise ApiError(413, f"{source}: {voxels} voxels at {grid_size:g} m exceed the limit of "
                                f"{self.settings.max_voxels} (PONDER_MAX_VOXELS); split the scene or use a coarser grid")

    def _read(self, upload: CloudUpload, keep_invalid: bool = False) -> PointCloud:
        limits = ReadLimits(max_points=self.settings.max_points, max_bytes=self.settings.max_decoded_bytes)
        try:
            return read_point_cloud(upload.source, format=upload.format, name=upload.name, limits=limits,
                                    keep_invalid=keep_invalid)
        finally:
            close = getattr(upload.source, "close", None)
            if close is not None:
                close()

    def _fuse(self, upload: RGBDUpload, grid_size: float | None = None) -> PointCloud:
        cameras, depth_scale = parse_cameras(upload.cameras)
        unknown = sorted(set(upload.color) - set(upload.depth))
        if unknown:
            raise RGBDError(f"colour images without a depth image: {', '.join('color_' + k for k in unknown)}")
        missing = sorted(set(upload.depth) - set(cameras))
        if missing:
            raise RGBDError(f"no camera for views {', '.join(missing)} in the cameras part "
                            f"(it has {', '.join(cameras)})")
        check_image_budget(upload.depth, upload.color, self.settings.max_decoded_bytes,  # before decoding
                           self.settings.rgbd_max_pixels)
        views = [RGBDView(depth=decode_depth(data, f"depth_{key}"), camera=cameras[key],
                          color=decode_color(upload.color[key], f"color_{key}") if key in upload.color else None,
                          name=key)
                 for key, data in sorted(upload.depth.items())]
        return fuse_views(views, depth_scale=depth_scale or self.settings.depth_scale,
                          voxel_size=self.settings.rgbd_voxel_m, max_depth=self.settings.rgbd_max_depth_m,
                          source=f"rgbd ({len(views)} views)", max_points=self.settings.max_points,
                          before_normals=None if grid_size is None else
                          (lambda fused: self._check_voxels(fused, grid_size, f"rgbd ({len(views)} views)")))

    @staticmethod
    def _prepare_points(cloud: PointCloud, card: ModelCard, grid_size: float | None,
                        options: InputOptions | None) -> PreparedCloud:
        try:
            prepared = prepare_cloud(cloud, grid_size or card.info.grid_size, card.info.input_features, options)
        except PointCloudError as exc:
            raise ApiError(422, str(exc)) from exc
        _log_prepared(prepared)
        return prepared

    @staticmethod
    def _prepare(cloud: PointCloud, card: ModelCard, grid_size: float | None, options: InputOptions | None
                 ) -> tuple[PreparedCloud, VoxelizedCloud]:
        """The model's own input pipeline (model.prepare, as Predictor.prepare_input)."""
        try:
            prepared, voxels = prepare(cloud, grid_size or card.info.grid_size, card.info.input_features, options)
        except PointCloudError as exc:
            raise ApiError(422, str(exc)) from exc
        _log_prepared(prepared)
        return prepared, voxels


def _log_prepared(prepared: PreparedCloud) -> None:
    if prepared.dropped:
        LOG.warning("dropped %d of %d points with NaN or infinite coordinates or normals", prepared.dropped,
                    prepared.num_input, extra={"dropped_points": prepared.dropped})
    if prepared.rotation is not None:
        LOG.info("rotated the upload into z-up", extra={"up_rotation": prepared.rotation.round(6).tolist()})


def prepared_meta(prepared: PreparedCloud) -> dict:
    """Answer metadata (also headers) telling how the input mapped to the model: ``dropped_points``
    (X-Ponder-Dropped-Points), ``up_rotation`` (X-Ponder-Up-Rotation, 3x3 row-major, input → z-up) and the
    organised ``grid_shape`` [height, width] of the input (X-Ponder-Grid-Shape)."""
    meta: dict = {}
    if prepared.filled:
        meta["filled"] = list(prepared.filled)
    if prepared.dropped:
        meta["dropped_points"] = prepared.dropped
    if prepared.rotation is not None:
        meta["up_rotation"] = [[round(float(v), 9) for v in row] for row in prepared.rotation]
    if prepared.grid_shape is not None:
        meta["grid_shape"] = list(prepared.grid_shape)
    return meta

"""The request pipeline shared by every model route: decode (thread pool) -> limits -> voxelise (thread
pool) -> worker (queue + batched forward pass). Every bad-input case ends here as an ApiError with a
message; the event loop only awaits."""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Callable

from model.pointcloud.cloud import PointCloud, PointCloudError
from model.pointcloud.readers import read_point_cloud
from model.pointcloud.voxelize import VoxelizedCloud, complete_cloud, voxelize
from service.errors import ApiError
from service.metrics import ServiceMetrics
from service.rgbd import RGBDError, RGBDView, decode_color, decode_depth, fuse_views, parse_cameras
from service.settings import ServiceSettings
from service.uploads import CloudUpload, RGBDUpload
from service.workers.base import (EncodeJob, EncodeOutput, ModelCard, Worker, WorkerBusy, WorkerFailed,
                                  WorkerInputError, WorkerUnavailable, WorkerUnsupported)


@dataclass
class Processed:
    """A request's model output with everything needed to shape the answer."""

    card: ModelCard
    condition: str | None
    voxels: VoxelizedCloud
    output: EncodeOutput
    filled: list[str] = field(default_factory=list)  # input fields the server had to fill in

    @property
    def num_points(self) -> int:
        return self.voxels.num_points


class Pipeline:
    def __init__(self, settings: ServiceSettings, worker: Worker, metrics: ServiceMetrics) -> None:
        self.settings = settings
        self.worker = worker
        self.metrics = metrics
        self._pool = ThreadPoolExecutor(max_workers=settings.preprocess_threads, thread_name_prefix="ponder-prep")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def _in_pool(self, fn: Callable[..., Any], *args: Any) -> Any:
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
    async def deadline(self, timeout_s: float) -> AsyncIterator[None]:
        """Run the body within ``timeout_s`` (504 after it) and turn worker failures into ApiErrors."""
        try:
            async with asyncio.timeout(timeout_s):
                yield
        except TimeoutError as exc:
            raise ApiError(504, f"the request did not finish within {timeout_s:g} s "
                                f"(PONDER_REQUEST_TIMEOUT_S or ?timeout_s=)") from exc
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

    async def run(self, upload: CloudUpload | RGBDUpload, card: ModelCard, condition: str | None,
                  grid_size: float | None, want_logits: bool, timeout_s: float) -> Processed:
        """Decode, voxelise and encode one upload within ``timeout_s`` (504 after it)."""
        async with self.deadline(timeout_s):
            start = time.perf_counter()
            cloud = await self._in_pool(self._decode, upload)
            filled = self._missing(cloud, card)
            voxels = await self._in_pool(self._voxelize, cloud, card, grid_size)
            self.metrics.preprocess_latency.observe(time.perf_counter() - start)
            job = EncodeJob(model=card.info.name, voxels=voxels, condition=condition, want_logits=want_logits)
            output = await self.worker.run(job)
        return Processed(card=card, condition=condition, voxels=voxels, output=output, filled=filled)

    async def decode_cloud(self, upload: CloudUpload | RGBDUpload, card: ModelCard, grid_size: float | None
                           ) -> tuple[PointCloud, list[str]]:
        """For model jobs that voxelise themselves (detection, rendering): the decoded cloud with missing
        colours/normals already filled here (so the model thread does not), and the names of those filled."""
        start = time.perf_counter()
        cloud = await self._in_pool(self._decode, upload)
        filled = self._missing(cloud, card)
        cloud = await self._in_pool(self._complete, cloud, card, grid_size)
        self.metrics.preprocess_latency.observe(time.perf_counter() - start)
        return cloud, filled

    @staticmethod
    def _missing(cloud: PointCloud, card: ModelCard) -> list[str]:
        return [name for name in card.info.input_features
                if name in ("color", "normal") and getattr(cloud, name) is None]

    def _decode(self, upload: CloudUpload | RGBDUpload) -> PointCloud:
        try:
            cloud = self._fuse(upload) if isinstance(upload, RGBDUpload) else self._read(upload)
        except (PointCloudError, RGBDError) as exc:
            raise ApiError(422, str(exc)) from exc
        if len(cloud) > self.settings.max_points:
            raise ApiError(413, f"{cloud.source}: {len(cloud)} points exceed the limit of "
                                f"{self.settings.max_points} (PONDER_MAX_POINTS); split the scene")
        return cloud

    @staticmethod
    def _read(upload: CloudUpload) -> PointCloud:
        try:
            return read_point_cloud(upload.source, format=upload.format, name=upload.name)
        finally:
            close = getattr(upload.source, "close", None)
            if close is not None:
                close()

    def _fuse(self, upload: RGBDUpload) -> PointCloud:
        cameras, depth_scale = parse_cameras(upload.cameras)
        unknown = sorted(set(upload.color) - set(upload.depth))
        if unknown:
            raise RGBDError(f"colour images without a depth image: {', '.join('color_' + k for k in unknown)}")
        missing = sorted(set(upload.depth) - set(cameras))
        if missing:
            raise RGBDError(f"no camera for views {', '.join(missing)} in the cameras part "
                            f"(it has {', '.join(cameras)})")
        views = [RGBDView(depth=decode_depth(data, f"depth_{key}"), camera=cameras[key],
                          color=decode_color(upload.color[key], f"color_{key}") if key in upload.color else None,
                          name=key)
                 for key, data in sorted(upload.depth.items())]
        return fuse_views(views, depth_scale=depth_scale or self.settings.depth_scale,
                          voxel_size=self.settings.rgbd_voxel_m, max_depth=self.settings.rgbd_max_depth_m,
                          source=f"rgbd ({len(views)} views)")

    @staticmethod
    def _complete(cloud: PointCloud, card: ModelCard, grid_size: float | None) -> PointCloud:
        try:
            completed = complete_cloud(cloud, grid_size or card.info.grid_size, card.info.input_features)
        except PointCloudError as exc:
            raise ApiError(422, str(exc)) from exc
        completed.origin = cloud.origin  # normals.fill_missing builds a new cloud without it
        return completed

    @staticmethod
    def _voxelize(cloud: PointCloud, card: ModelCard, grid_size: float | None) -> VoxelizedCloud:
        """The model's own input pipeline (Predictor.prepare does the same call)."""
        try:
            return voxelize(cloud, grid_size or card.info.grid_size, card.info.input_features)
        except PointCloudError as exc:
            raise ApiError(422, str(exc)) from exc

"""The in-process worker: models loaded once in the gateway, a bounded asyncio queue, and one batching
loop that merges up to ``max_batch`` waiting requests (or what arrived within ``max_wait_ms``) into one
``Predictor.encode`` call, run in a dedicated thread so the event loop never waits on the model. Model jobs
(detection, rendering) share that queue and thread, one job per call, so every request sees the same
queue limit, timeout and metrics."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

from model.inference import Predictor
from service.metrics import ServiceMetrics
from service.settings import ServiceSettings
from service.workers.base import (EncodeJob, EncodeOutput, ModelCard, ModelJob, Worker, WorkerBusy,
                                  WorkerInputError)
from service.workers.loading import discover_checkpoints, load_predictors

LOG = logging.getLogger("service.worker")


@dataclass
class _Pending:
    job: EncodeJob | ModelJob
    future: asyncio.Future
    request_id: str | None


class InProcessWorker(Worker):
    kind = "inprocess"
    runs_model_jobs = True

    def __init__(self, settings: ServiceSettings, metrics: ServiceMetrics,
                 predictors: dict[str, Predictor] | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self._predictors = predictors or {}
        self._cards: dict[str, ModelCard] = {}
        self._queue: asyncio.Queue[_Pending] | None = None
        self._loop_task: asyncio.Task | None = None
        # One model thread: forward passes are serial, torch parallelises inside each one.
        self._model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ponder-model")

    async def start(self) -> None:
        if not self._predictors:
            if self.settings.torch_threads:
                import torch

                torch.set_num_threads(self.settings.torch_threads)
            checkpoints = discover_checkpoints(self.settings.checkpoint, self.settings.models_dir)
            self._predictors = await asyncio.to_thread(
                load_predictors, checkpoints, self.settings.device, self.settings.trust_checkpoint,
                self.settings.backend)
        self._cards = {name: ModelCard.of(name, p) for name, p in self._predictors.items()}
        self._queue = asyncio.Queue(maxsize=self.settings.queue_size)
        self._loop_task = asyncio.create_task(self._batch_loop(), name="ponder-batching")

    async def stop(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            try:
                await self._loop_task
            except asyncio.CancelledError:
                pass
        if self._queue is not None:
            while not self._queue.empty():
                pending = self._queue.get_nowait()
                if not pending.future.done():
                    pending.future.set_exception(WorkerBusy("the server is shutting down"))
        self._model_thread.shutdown(wait=True, cancel_futures=True)

    def models(self) -> dict[str, ModelCard]:
        return self._cards

    async def ready(self) -> tuple[bool, str]:
        if not self._predictors:
            return False, "no model loaded yet"
        if self._loop_task is None or self._loop_task.done():
            return False, "the batching loop is not running"
        return True, f"{len(self._predictors)} model(s) loaded in process"

    def queue_depth(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    async def run(self, job: EncodeJob) -> EncodeOutput:
        return await self._submit(job)

    async def call(self, job: ModelJob) -> Any:
        if job.model not in self._predictors:
            raise WorkerInputError(f"unknown model {job.model!r}")
        return await self._submit(job)

    async def _submit(self, job: EncodeJob | ModelJob) -> Any:
        assert self._queue is not None, "worker not started"
        from service.logs import request_id_var

        future = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait(_Pending(job, future, request_id_var.get()))
        except asyncio.QueueFull:
            self.metrics.rejected.inc()
            raise WorkerBusy(f"the model queue is full ({self.settings.queue_size} requests waiting); retry shortly")
        self.metrics.queue_depth.set(self._queue.qsize())
        return await future

    async def _collect(self) -> list[_Pending]:
        """The next batch: block for one request, then take more until max_batch or max_wait_ms."""
        assert self._queue is not None
        batch = [await self._queue.get()]
        deadline = time.monotonic() + self.settings.max_wait_ms / 1000
        while len(batch) < self.settings.max_batch:
            remaining = deadline - time.monotonic()
            try:
                if remaining <= 0:
                    batch.append(self._queue.get_nowait())
                else:
                    batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except (asyncio.QueueEmpty, TimeoutError):
                break
        self.metrics.queue_depth.set(self._queue.qsize())
        return [p for p in batch if not p.future.done()]  # timed-out or cancelled requests are skipped

    @staticmethod
    def _groups(batch: list[_Pending]) -> list[list[_Pending]]:
        """Encode jobs merge per (model, condition); each model job runs on its own."""
        groups: dict[tuple, list[_Pending]] = defaultdict(list)
        for pending in batch:
            job = pending.job
            key = (job.model, job.condition) if isinstance(job, EncodeJob) else ("job", id(pending))
            groups[key].append(pending)
        return list(groups.values())

    def _work_of(self, members: list[_Pending]) -> Callable[[], list[Any]]:
        first = members[0].job
        if isinstance(first, ModelJob):
            return lambda: [first.fn(self._predictors[first.model])]
        return lambda: self._infer(first.model, first.condition, [m.job for m in members])

    async def _batch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            for members in self._groups(batch):
                model = members[0].job.model
                what = getattr(members[0].job, "name", "encode")
                self.metrics.batch_size.observe(len(members))
                start = time.perf_counter()
                ctx = contextvars.copy_context()
                try:
                    outputs = await loop.run_in_executor(self._model_thread, ctx.run, self._work_of(members))
                except Exception as exc:  # noqa: BLE001 - delivered to every request of the group
                    LOG.warning("%s batch of %d for %s failed: %s", what, len(members), model, exc,
                                extra={"batch_request_ids": [m.request_id for m in members]})
                    for m in members:
                        if not m.future.done():
                            m.future.set_exception(exc)
                    continue
                elapsed = time.perf_counter() - start
                self.metrics.worker_latency.labels(self.kind).observe(elapsed)
                LOG.debug("%s batch of %d for %s in %.1f ms", what, len(members), model, elapsed * 1000,
                          extra={"batch_request_ids": [m.request_id for m in members]})
                for m, out in zip(members, outputs):
                    if not m.future.done():
                        m.future.set_result(out)

    def _infer(self, model: str, condition: str | None, jobs: list[EncodeJob]) -> list[EncodeOutput]:
        """One forward pass for the whole group (runs in the model thread)."""
        predictor = self._predictors[model]
        features = predictor.encode([j.voxels for j in jobs], condition=condition)  # [(M_i, C)]
        self.metrics.voxels.inc(sum(len(f) for f in features))
        logits: list = [None] * len(jobs)
        wanted = [i for i, j in enumerate(jobs) if j.want_logits]
        if wanted:
            for i, lg in zip(wanted, predictor.classify([features[i] for i in wanted], condition=condition)):
                logits[i] = lg  # (M_i, K)
        return [EncodeOutput(f, lg) for f, lg in zip(features, logits)]

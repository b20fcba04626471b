"""The in-process worker: models loaded once in the gateway and two lanes, each with its own bounded
admission, asyncio queue and model thread(s), so one kind of work never waits behind the other:

* the fast lane batches encoder passes (features, segment): its loop merges up to ``max_batch`` waiting
  requests (or what arrived within ``max_wait_ms``) into one ``Predictor.encode`` call;
* the long lane runs model jobs (render, precise segmentation, detection), ``long_concurrency`` at a time.

Torch work runs on the fast lane's thread (``torch_threads``; it also loads the models: models loaded on
yet another thread made the service's forward 3.4 s against 1.7 s in ``ponder features``) and on one
short-lived thread per long job (``long_torch_threads``, default the same count), whose OpenMP team goes with
it (``service.workers.model_thread``).

Every job carries its request's ``model.cancel.CancelToken``: a job whose request timed out, disconnected or
was refused at shutdown is skipped in the queue, and a running job stops at its next chunk (the token is
made active while it runs; rendering and precise segmentation check it per chunk, the CPU engine between
encoder blocks; an encoder batch stops once none of its requests still waits). A thread still running
``STUCK_GRACE_S`` after its job's deadline (spconv and exported backends cannot be interrupted mid-forward)
makes ``ready`` false.
The model threads are daemon threads, so such a pass never holds the process at exit."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable

from model.cancel import AllCancelled, CancelToken, Cancelled, active
from model.inference import Predictor
from service.metrics import ServiceMetrics
from service.settings import ServiceSettings
from service.workers.base import (FAST, LONG, SHUTTING_DOWN, EncodeJob, EncodeOutput, ModelCard, ModelJob, Ticket, Worker,
                                  WorkerBusy, WorkerInputError)
from service.workers.loading import discover_checkpoints, load_predictors
from service.workers.model_thread import ModelThread

LOG = logging.getLogger("service.worker")
STUCK_GRACE_S = 2.0  # a model thread this long past its job's deadline is reported stuck by /readyz
STOP_JOIN_S = 5.0  # how long stop() waits for each model thread to return after cancelling its job


@dataclass(eq=False)
class _Pending:
    job: EncodeJob | ModelJob
    future: asyncio.Future
    request_id: str | None
    token: CancelToken = field(default_factory=CancelToken)

    @property
    def skip(self) -> bool:
        """Nobody waits for it any more (timed out, disconnected, refused at shutdown)."""
        return self.future.done() or self.token.cancelled


def _voxels(pending: _Pending) -> int:
    """Voxels an encode job adds to a batched forward (0 for other jobs)."""
    job = pending.job
    return job.voxels.num_voxels if isinstance(job, EncodeJob) else 0


@dataclass
class StandaloneJob(ModelJob):
    """A long-lane job for a model the gateway loads itself rather than a served point-cloud model (the image
    models of ``service.image_jobs``): ``model`` is that model's own name, in logs and for its own
    one-job-at-a-time lock, and ``fn`` receives None (it brings its model)."""


class _Lane:
    """Admission (at most ``waiting + concurrency`` requests from admission to answer), a queue and threads."""

    def __init__(self, name: str, waiting: int, concurrency: int, metrics: ServiceMetrics,
                 torch_threads: int | None = None, thread_per_call: bool = False) -> None:
        self.name = name
        self.capacity = waiting + concurrency
        self.metrics = metrics
        self.reserved = 0
        self.queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self.carried: _Pending | None = None  # taken off the queue but left for the next batch (voxel budget)
        self.live: set[_Pending] = set()
        self.threads = [ModelThread(f"ponder-{name}-{i}", torch_threads, thread_per_call) for i in range(concurrency)]

    def check(self) -> None:
        """WorkerBusy (counted as a rejection) when the lane is full."""
        if self.saturated:
            self.metrics.rejected.inc()
            raise WorkerBusy(f"the {self.name} lane's queue is full ({self.capacity} requests admitted); "
                             "retry shortly")

    def admit(self) -> Ticket:
        self.check()
        self.reserved += 1
        return Ticket(self._release)

    def _release(self) -> None:
        self.reserved -= 1

    @property
    def saturated(self) -> bool:
        return self.reserved >= self.capacity

    def stuck(self, now: float) -> float:
        return max((t.overdue(now) for t in self.threads), default=0.0)


class InProcessWorker(Worker):
    kind = "inprocess"
    runs_model_jobs = True

    def __init__(self, settings: ServiceSettings, metrics: ServiceMetrics,
                 predictors: dict[str, Predictor] | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self._predictors = predictors or {}
        self._cards: dict[str, ModelCard] = {}
        self._lanes: dict[str, _Lane] = {}
        self._tasks: list[asyncio.Task] = []
        self._model_locks: dict[tuple[bool, str], threading.Lock] = defaultdict(threading.Lock)
        self._closing: str | None = None  # set by cancel_all: later requests are refused with this reason

    async def start(self) -> None:
        import torch

        settings = self.settings
        fast = _Lane(FAST, settings.queue_size + settings.max_batch - 1, 1, self.metrics,  # a batch runs
                     settings.torch_threads or torch.get_num_threads())
        long = _Lane(LONG, settings.long_queue_size, settings.long_concurrency, self.metrics,
                     settings.long_torch_threads or fast.threads[0].torch_threads, thread_per_call=True)
        if not self._predictors:  # loaded on the fast lane's thread: its OpenMP team is the only multi-threaded one
            try:
                checkpoints = discover_checkpoints(settings.checkpoint, settings.models_dir)
                self._predictors = await asyncio.wrap_future(fast.threads[0].submit(
                    lambda: load_predictors(checkpoints, settings.device, settings.trust_checkpoint, settings.backend),
                    None))
            except BaseException:
                for thread in fast.threads + long.threads:  # each ends after its current call; no wait here
                    thread.close(0)
                raise
        self._cards = {name: ModelCard.of(name, p) for name, p in self._predictors.items()}
        self._lanes = {FAST: fast, LONG: long}
        self._tasks = [asyncio.create_task(self._batch_loop(fast, fast.threads[0]), name="ponder-fast")]
        self._tasks += [asyncio.create_task(self._job_loop(long, thread), name=f"ponder-long-{i}")
                        for i, thread in enumerate(long.threads)]

    async def stop(self) -> None:
        self.cancel_all(SHUTTING_DOWN)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass
        for lane in self._lanes.values():
            for thread in lane.threads:
                if not await asyncio.to_thread(thread.close, STOP_JOIN_S):
                    LOG.warning("model thread %s is still inside a forward pass; leaving it (daemon)", thread.name)

    def cancel_all(self, reason: str) -> int:
        self._closing = reason
        count = 0
        for lane in self._lanes.values():
            for pending in list(lane.live):
                pending.token.cancel(reason)
                if not pending.future.done():
                    pending.future.set_exception(WorkerBusy(reason, retry_after=5))
                count += 1
        return count

    def models(self) -> dict[str, ModelCard]:
        return self._cards

    async def ready(self) -> tuple[bool, str]:
        if not self._predictors:
            return False, "no model loaded yet"
        if not self._tasks or any(task.done() for task in self._tasks):
            return False, "a lane's loop is not running"
        now = time.monotonic()
        for lane in self._lanes.values():
            overdue = lane.stuck(now)
            if overdue > STUCK_GRACE_S:
                return False, (f"the {lane.name} lane's model thread is {overdue:.1f} s past its request's deadline "
                               "(inside a pass that cannot be interrupted)")
            if lane.saturated:
                return False, f"the {lane.name} lane's queue is full ({lane.reserved} requests admitted)"
        return True, f"{len(self._predictors)} model(s) loaded in process"

    def queue_depth(self) -> int:
        return sum(lane.queue.qsize() + (lane.carried is not None) for lane in self._lanes.values())

    def admit(self, lane: str = FAST) -> Ticket:
        self.check_admission(lane)
        return self._lanes[lane].admit()

    def check_admission(self, lane: str = FAST) -> None:
        assert self._lanes, "worker not started"
        if self._closing:
            raise WorkerBusy(self._closing, retry_after=5)
        self._lanes[lane].check()

    async def run(self, job: EncodeJob) -> EncodeOutput:
        return await self._submit(self._lanes[FAST], job)

    async def call(self, job: ModelJob) -> Any:
        if not isinstance(job, StandaloneJob) and job.model not in self._predictors:
            raise WorkerInputError(f"unknown model {job.model!r}")
        return await self._submit(self._lanes[LONG], job)

    async def _submit(self, lane: _Lane, job: EncodeJob | ModelJob) -> Any:
        assert self._lanes, "worker not started"
        from service.logs import request_id_var

        if self._closing:
            raise WorkerBusy(self._closing, retry_after=5)
        ticket = job.ticket if job.ticket is not None else lane.admit()
        pending = _Pending(job, asyncio.get_running_loop().create_future(), request_id_var.get(),
                           job.cancel or CancelToken())
        lane.live.add(pending)
        lane.queue.put_nowait(pending)
        self._set_depth()
        try:
            return await pending.future
        except asyncio.CancelledError:  # the request timed out or its client left: skip or stop its job
            pending.token.cancel("the request was cancelled (timeout or disconnect)")
            raise
        finally:
            lane.live.discard(pending)
            if job.ticket is None:
                ticket.release()

    def _set_depth(self) -> None:
        self.metrics.queue_depth.set(self.queue_depth())

    async def _next(self, lane: _Lane) -> _Pending:
        """The next request still waited for; skipped ones are dropped here."""
        while True:
            pending = await lane.queue.get()
            if not pending.skip:
                return pending

    async def _collect(self, lane: _Lane) -> list[_Pending]:
        """The next batch: block for one request (or take the one carried over), then take more until
        max_batch, max_wait_ms or max_batch_voxels: the request that would pass the voxel budget is carried
        over to the next batch, so a forward never holds more than one largest scene's activations (a
        scene alone always runs)."""
        carried, lane.carried = lane.carried, None
        batch = [carried if carried is not None and not carried.skip else await self._next(lane)]
        voxels = _voxels(batch[0])
        deadline = time.monotonic() + self.settings.max_wait_ms / 1000
        while len(batch) < self.settings.max_batch:
            remaining = deadline - time.monotonic()
            try:
                if remaining <= 0:
                    pending = lane.queue.get_nowait()
                else:
                    pending = await asyncio.wait_for(lane.queue.get(), remaining)
            except (asyncio.QueueEmpty, TimeoutError):
                break
            if voxels + _voxels(pending) > self.settings.max_batch_voxels and not pending.skip:
                lane.carried = pending
                break
            batch.append(pending)
            voxels += _voxels(pending)
        self._set_depth()
        return [p for p in batch if not p.skip]

    @staticmethod
    def _groups(batch: list[_Pending]) -> list[list[_Pending]]:
        """Encode jobs merge per (model, condition)."""
        groups: dict[tuple, list[_Pending]] = defaultdict(list)
        for pending in batch:
            groups[(pending.job.model, pending.job.condition)].append(pending)
        return list(groups.values())

    async def _execute(self, thread: ModelThread, members: list[_Pending], work: Callable[[], list[Any]],
                       what: str) -> None:
        """Run ``work`` on ``thread`` and deliver its outputs (or its error) to the members still waiting."""
        deadlines = [m.token.deadline for m in members]
        deadline = None if any(d is None for d in deadlines) else max(deadlines)  # type: ignore[type-var]
        model = members[0].job.model
        self.metrics.batch_size.observe(len(members))
        start = time.perf_counter()
        ctx = contextvars.copy_context()
        try:
            outputs = await asyncio.wrap_future(thread.submit(lambda: ctx.run(work), deadline))
        except Exception as exc:  # noqa: BLE001 - delivered to every request of the group
            level = logging.INFO if isinstance(exc, Cancelled) else logging.WARNING
            LOG.log(level, "%s of %d for %s stopped: %s", what, len(members), model, exc,
                    extra={"batch_request_ids": [m.request_id for m in members]})
            for m in members:
                if not m.future.done():
                    m.future.set_exception(exc)
            return
        elapsed = time.perf_counter() - start
        self.metrics.worker_latency.labels(self.kind).observe(elapsed)
        LOG.debug("%s of %d for %s in %.1f ms", what, len(members), model, elapsed * 1000,
                  extra={"batch_request_ids": [m.request_id for m in members]})
        for m, out in zip(members, outputs):
            if not m.future.done():
                m.future.set_result(out)

    async def _batch_loop(self, lane: _Lane, thread: ModelThread) -> None:
        while True:
            batch = await self._collect(lane)
            for members in self._groups(batch):
                members = [m for m in members if not m.skip]
                if members:
                    first = members[0].job
                    await self._execute(thread, members, self._encode_work(first.model, first.condition, members),
                                        "encode batch")

    async def _job_loop(self, lane: _Lane, thread: ModelThread) -> None:
        while True:
            pending = await self._next(lane)
            self._set_depth()
            await self._execute(thread, [pending], self._job_work(pending), pending.job.name)

    def _encode_work(self, model: str, condition: str | None, members: list[_Pending]) -> Callable[[], list]:
        token = AllCancelled([m.token for m in members])  # the encoder stops between blocks once none waits

        def work() -> list[EncodeOutput]:
            with active(token):
                return self._infer(model, condition, [m.job for m in members])  # type: ignore[misc]

        return work

    def _job_work(self, pending: _Pending) -> Callable[[], list[Any]]:
        job = pending.job
        assert isinstance(job, ModelJob)

        standalone = isinstance(job, StandaloneJob)  # not a served predictor: fn gets None, and its own lock
        lock = self._model_locks[standalone, job.model]  # a model's spconv layers keep per-call state: one job at once

        def work() -> list[Any]:
            while not lock.acquire(timeout=0.1):
                pending.token.check()
            try:
                with active(pending.token):
                    pending.token.check()
                    return [job.fn(None if standalone else self._predictors[job.model])]
            finally:
                lock.release()

        return work

    def _infer(self, model: str, condition: str | None, jobs: list[EncodeJob]) -> list[EncodeOutput]:
        """One forward pass for the whole group (runs in the fast lane's model thread)."""
        predictor = self._predictors[model]
        features = predictor.encode([j.voxels for j in jobs], condition=condition)  # [(M_i, C)]
        self.metrics.voxels.inc(sum(len(f) for f in features))
        logits: list = [None] * len(jobs)
        wanted = [i for i, j in enumerate(jobs) if j.want_logits]
        if wanted:
            for i, lg in zip(wanted, predictor.classify([features[i] for i in wanted], condition=condition)):
                logits[i] = lg  # (M_i, K)
        return [EncodeOutput(f, lg) for f, lg in zip(features, logits)]

"""The Triton worker: the gateway decodes and voxelises, then sends the tensors to one of several Triton
endpoints (``ponder worker --triton``) over gRPC (default) or HTTP with tritonclient's asyncio clients.

Robustness: endpoints are used round-robin; each has a circuit breaker (``breaker_failures`` consecutive
failures open it for ``breaker_reset_s``, then one trial call decides); transient errors (connection,
UNAVAILABLE, 5xx) are retried on the next endpoint with exponential backoff; input errors are not retried.
In-flight requests are bounded by ``queue_size`` (503 beyond it).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.metrics import ServiceMetrics
from service.settings import ServiceSettings
from service.workers.base import (EncodeJob, EncodeOutput, ModelCard, Worker, WorkerBusy, WorkerFailed,
                                  WorkerInputError, WorkerUnavailable)
from service.workers.triton_server import INFO_MODEL

LOG = logging.getLogger("service.triton")
_TRANSIENT = {"StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED", "StatusCode.RESOURCE_EXHAUSTED",
              "StatusCode.ABORTED", "429", "502", "503", "504"}
_INPUT = {"StatusCode.INVALID_ARGUMENT", "StatusCode.NOT_FOUND", "StatusCode.FAILED_PRECONDITION", "400", "404"}
_EXCEPTION_LINE = re.compile(r"^\s*(?:\w+\.)*\w*(?:Error|Exception): .+$", re.MULTILINE)


def _short(message: str) -> str:
    """The last ``SomeError: text`` line of a server-side traceback (the whole message if none)."""
    lines = [m.group(0).strip() for m in _EXCEPTION_LINE.finditer(message)]
    return lines[-1] if lines else message.strip()[:500]


class CircuitBreaker:
    """closed -> (``failures`` in a row) -> open -> (after ``reset_s``) half-open: one trial call closes
    it again on success or re-opens it on failure."""

    def __init__(self, failures: int, reset_s: float) -> None:
        self.failures = failures
        self.reset_s = reset_s
        self.count = 0
        self.opened_at: float | None = None
        self.trial_in_flight = False

    @property
    def state(self) -> str:
        if self.opened_at is None:
            return "closed"
        return "half-open" if time.monotonic() >= self.opened_at + self.reset_s else "open"

    def allow(self) -> bool:
        state = self.state
        if state == "closed":
            return True
        if state == "half-open" and not self.trial_in_flight:
            self.trial_in_flight = True
            return True
        return False

    def record(self, ok: bool) -> None:
        self.trial_in_flight = False
        if ok:
            self.count, self.opened_at = 0, None
            return
        self.count += 1
        if self.opened_at is not None or self.count >= self.failures:
            self.opened_at = time.monotonic()


@dataclass
class _Endpoint:
    url: str
    client: Any
    breaker: CircuitBreaker
    protocol: str = "grpc"


class _TransientError(Exception):
    pass


class TritonWorker(Worker):
    kind = "triton"

    def __init__(self, settings: ServiceSettings, metrics: ServiceMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self._endpoints: list[_Endpoint] = []
        self._next = 0
        self._in_flight = 0
        self._cards: dict[str, ModelCard] = {}
        self._discovery: asyncio.Task | None = None

    # -- lifecycle -------------------------------------------------------------------------------------
    def _client_module(self):
        if self.settings.triton_protocol == "http":
            import tritonclient.http as module
            import tritonclient.http.aio as aio
        else:
            import tritonclient.grpc as module
            import tritonclient.grpc.aio as aio
        return module, aio

    async def start(self) -> None:
        if not self.settings.triton_urls:
            raise ValueError("PONDER_TRITON_URLS is empty: name at least one Triton endpoint (host:port)")
        _, aio = self._client_module()
        for url in self.settings.triton_urls:
            self._endpoints.append(_Endpoint(url=url, client=aio.InferenceServerClient(url=url),
                                             protocol=self.settings.triton_protocol,
                                             breaker=CircuitBreaker(self.settings.breaker_failures,
                                                                    self.settings.breaker_reset_s)))
        # The gateway may start before Triton: learn the models in the background until one answers.
        self._discovery = asyncio.create_task(self._discover_models(), name="ponder-triton-discovery")
        wait = self.settings.triton_startup_wait_s
        try:
            await asyncio.wait_for(asyncio.shield(self._discovery), timeout=wait)
        except TimeoutError:
            LOG.warning("no Triton endpoint answered within %g s; still trying in the background", wait)

    async def stop(self) -> None:
        if self._discovery is not None and not self._discovery.done():
            self._discovery.cancel()
        for endpoint in self._endpoints:  # an open client makes Triton wait out its exit timeout
            try:
                await endpoint.client.close()
            except Exception as exc:  # noqa: BLE001 - closing is best effort
                LOG.debug("closing the client of %s: %s", endpoint.url, exc)

    async def _discover_models(self) -> None:
        module, _ = self._client_module()
        delay = 0.2
        while not self._cards:
            for endpoint in self._endpoints:
                try:
                    query = module.InferInput("query", [1], "BYTES")
                    query.set_data_from_numpy(np.array([b"cards"], dtype=np.object_))
                    result = await endpoint.client.infer(INFO_MODEL, [query])
                    raw = result.as_numpy("cards").reshape(-1)[0]
                    cards = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
                    self._cards = {name: ModelCard.from_dict(card) for name, card in cards.items()}
                    LOG.info("Triton at %s serves %s", endpoint.url, ", ".join(self._cards))
                    return
                except Exception as exc:  # noqa: BLE001 - retried until a server answers
                    LOG.debug("model discovery on %s failed: %s", endpoint.url, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    def models(self) -> dict[str, ModelCard]:
        return self._cards

    async def ready(self) -> tuple[bool, str]:
        if not self._cards:
            return False, "no Triton endpoint has answered the model list yet"
        for endpoint in self._endpoints:
            if endpoint.breaker.state == "open":
                continue
            try:
                if await endpoint.client.is_server_ready():
                    return True, f"Triton endpoint {endpoint.url} is ready"
            except Exception as exc:  # noqa: BLE001 - an unreachable endpoint is simply not ready
                LOG.debug("readiness of %s: %s", endpoint.url, exc)
        return False, f"no Triton endpoint is ready ({', '.join(e.url for e in self._endpoints)})"

    def queue_depth(self) -> int:
        return self._in_flight

    # -- inference ---------------------------------------------------------------------------------------
    def _pick(self) -> _Endpoint | None:
        """The next endpoint in round-robin order whose breaker lets a call through."""
        for _ in range(len(self._endpoints)):
            endpoint = self._endpoints[self._next % len(self._endpoints)]
            self._next += 1
            if endpoint.breaker.allow():
                return endpoint
        return None

    def _request(self, job: EncodeJob) -> tuple[list, list]:
        module, _ = self._client_module()
        grid = np.ascontiguousarray(job.voxels.grid_coord, dtype=np.int32)  # (M, 3)
        feat = np.ascontiguousarray(job.voxels.feat, dtype=np.float32)  # (M, C)
        condition = np.array([(job.condition or "").encode()], dtype=np.object_)  # (1,) BYTES
        inputs = []
        for name, array, dtype in (("grid_coord", grid, "INT32"), ("feat", feat, "FP32"),
                                   ("condition", condition, "BYTES")):
            tensor = module.InferInput(name, list(array.shape), dtype)
            if self.settings.triton_protocol == "http":
                tensor.set_data_from_numpy(array, binary_data=True)
            else:
                tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        names = ["features"] + (["logits"] if job.want_logits else [])
        if self.settings.triton_protocol == "http":
            outputs = [module.InferRequestedOutput(n, binary_data=True) for n in names]
        else:
            outputs = [module.InferRequestedOutput(n) for n in names]
        return inputs, outputs

    def _classify_error(self, exc: Exception) -> Exception:
        from tritonclient.utils import InferenceServerException

        if isinstance(exc, InferenceServerException):
            status = str(exc.status() or "")
            message = _short(exc.message() or str(exc))
            if status in _INPUT:
                return WorkerInputError(f"the model server refused the input: {message}")
            if status in _TRANSIENT or not status:  # no status: the connection itself failed
                return _TransientError(message)
            return WorkerFailed(f"{status}: {message}")
        if isinstance(exc, (OSError, TimeoutError, asyncio.TimeoutError)):
            return _TransientError(f"{type(exc).__name__}: {exc}")
        try:
            import aiohttp

            if isinstance(exc, aiohttp.ClientError):
                return _TransientError(f"{type(exc).__name__}: {exc}")
        except ImportError:
            pass
        return exc

    async def run(self, job: EncodeJob) -> EncodeOutput:
        if self._in_flight >= self.settings.queue_size:
            self.metrics.rejected.inc()
            raise WorkerBusy(f"{self._in_flight} requests are already waiting for Triton; retry shortly")
        inputs, outputs = self._request(job)
        self._in_flight += 1
        self.metrics.queue_depth.set(self._in_flight)
        try:
            return await self._call_with_retries(job, inputs, outputs)
        finally:
            self._in_flight -= 1
            self.metrics.queue_depth.set(self._in_flight)

    async def _call_with_retries(self, job: EncodeJob, inputs: list, outputs: list) -> EncodeOutput:
        last = "no endpoint configured"
        for attempt in range(self.settings.triton_retries + 1):
            if attempt:
                await asyncio.sleep(self.settings.triton_backoff_s * 2 ** (attempt - 1))
            endpoint = self._pick()
            if endpoint is None:
                last = "every Triton endpoint's circuit breaker is open"
                continue
            start = time.perf_counter()
            try:
                result = await endpoint.client.infer(job.model, inputs, outputs=outputs)
            except Exception as exc:  # noqa: BLE001 - sorted into input / transient / unexpected
                error = self._classify_error(exc)
                if isinstance(error, WorkerInputError):
                    endpoint.breaker.record(True)  # the server answered: it is healthy
                    raise error from exc
                endpoint.breaker.record(False)
                self.metrics.triton_errors.labels(endpoint.url).inc()
                self.metrics.breaker_open.labels(endpoint.url).set(endpoint.breaker.state != "closed")
                if not isinstance(error, _TransientError):
                    raise error from exc
                last = f"{endpoint.url}: {error}"
                LOG.warning("Triton call failed (attempt %d): %s", attempt + 1, last)
                continue
            endpoint.breaker.record(True)
            self.metrics.breaker_open.labels(endpoint.url).set(0)
            self.metrics.worker_latency.labels(self.kind).observe(time.perf_counter() - start)
            self.metrics.batch_size.observe(1)
            self.metrics.voxels.inc(job.voxels.num_voxels)
            features = result.as_numpy("features")
            logits = result.as_numpy("logits") if len(outputs) > 1 else None
            return EncodeOutput(features=features, logits=logits)
        raise WorkerUnavailable(f"gave up after {self.settings.triton_retries + 1} attempts ({last})")

"""The Triton worker: the gateway decodes and voxelises, then calls the ensemble of a repository written by
``ponder export triton-repo`` (served by ``ponder worker --triton --repo``) on one of several Triton endpoints,
over gRPC (default) or HTTP with tritonclient's asyncio clients. The request carries what the gateway has:
``grid_coord (M, 3) INT32``, ``batch (M,) INT32``, ``feat (M, C) FP32`` and, for conditional models,
``condition (1,) INT64``; Triton computes the kernel maps and runs the encoder (`export.triton_repo`).

Models: every ready ensemble with ponder metadata in its config parameters (read through the repository
index and the model configs) becomes a model card, in the repository's order, so the gateway needs no
checkpoint and serves the repository's model as its default.

Robustness: endpoints are used round-robin; each has a circuit breaker (``breaker_failures`` consecutive
failures open it for ``breaker_reset_s``, then one trial call decides); transient errors (connection,
UNAVAILABLE, a model that is not loaded (yet), a dead Python stub, 5xx) are retried on the next endpoint with
exponential backoff and end as 503 + Retry-After; input errors are not retried (422). In-flight requests are
bounded by ``queue_size`` (503 beyond it). gRPC channels reconnect within a second once a worker is back.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import numpy as np
import pybreaker
import tenacity

from model.conditions import condition_index, default_condition
from model.results import ModelInfo
from service.metrics import ServiceMetrics
from service.settings import ServiceSettings
from service.workers.base import (EncodeJob, EncodeOutput, ModelCard, Worker, WorkerBusy, WorkerFailed,
                                  WorkerInputError, WorkerUnavailable)

LOG = logging.getLogger("service.triton")
_TRANSIENT = {"StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED", "StatusCode.RESOURCE_EXHAUSTED",
              "StatusCode.ABORTED", "StatusCode.CANCELLED", "StatusCode.NOT_FOUND", "429", "502", "503", "504"}
_INPUT = {"StatusCode.INVALID_ARGUMENT", "StatusCode.FAILED_PRECONDITION", "StatusCode.OUT_OF_RANGE", "400"}
# A model that is not (yet / any more) loaded or a stub that died reads like this whatever the status says;
# the gateway checked the model name against the server's own list, so none of them is the input's fault.
_TRANSIENT_TEXT = re.compile(r"unknown model|is not ready|no available versions|is not healthy|stub process|"
                             r"server is stopping|socket closed", re.IGNORECASE)
_EXCEPTION_LINE = re.compile(r"^\s*(?:\w+\.)*\w*(?:Error|Exception): .+$", re.MULTILINE)
_CHANNEL_ARGS = [("grpc.max_send_message_length", 2**31 - 1), ("grpc.max_receive_message_length", 2**31 - 1),
                 ("grpc.initial_reconnect_backoff_ms", 200), ("grpc.min_reconnect_backoff_ms", 200),
                 ("grpc.max_reconnect_backoff_ms", 1000), ("grpc.keepalive_time_ms", 2**31 - 1)]


def _short(message: str) -> str:
    """The last ``SomeError: text`` line of a server-side traceback (the whole message if none)."""
    lines = [m.group(0).strip() for m in _EXCEPTION_LINE.finditer(message)]
    return lines[-1] if lines else message.strip()[:500]


def card_from_metadata(name: str, meta: dict) -> ModelCard:
    """A model card from the ponder metadata of an ensemble config (`export.triton_repo.config_metadata`)."""
    conditions = tuple(meta.get("conditions") or ())
    info = ModelInfo(name=name, kind=str(meta["kind"]), conditions=conditions,
                     class_names={k: tuple(v) for k, v in (meta.get("class_names") or {}).items()},
                     feature_dim=int(meta["out_channels"]), grid_size=float(meta["grid_size"]),
                     input_features=tuple(meta.get("input_features") or ("color", "normal")),
                     version=str(meta.get("version", "1")))
    return ModelCard(info=info, has_classifier="seg_logits" in (meta.get("outputs") or ()),
                     default_condition=default_condition(conditions))


class EndpointBreaker(pybreaker.CircuitBreaker):
    """pybreaker's circuit breaker for one endpoint: closed -> (``failures`` in a row) -> open -> (after
    ``reset_s``) the next call is the trial, whose outcome closes or re-opens it. Input errors are the
    caller's fault, not the server's, and a cancelled call (the client's deadline) says nothing about it: both
    count as successes (``exclude``). Calls run inside ``with breaker.calling():`` around the awaited request.

    What pybreaker leaves to its user is asked here from its own state and storage: whether it is still
    refusing (pybreaker keeps saying "open" after the timeout until a call arrives) and whether a call would
    be let through now; a trial in flight (pybreaker's "half-open") admits no second one."""

    def __init__(self, failures: int, reset_s: float, name: str | None = None) -> None:
        self.storage = pybreaker.CircuitMemoryStorage(pybreaker.STATE_CLOSED)
        super().__init__(fail_max=failures, reset_timeout=reset_s, name=name, state_storage=self.storage,
                         exclude=[WorkerInputError, asyncio.CancelledError], throw_new_error_on_trip=False)

    @property
    def refusing(self) -> bool:
        """Open and still within ``reset_s`` of opening."""
        opened = self.storage.opened_at
        return (self.current_state == pybreaker.STATE_OPEN and opened is not None
                and datetime.now(timezone.utc) < opened + timedelta(seconds=self.reset_timeout))

    def admits(self) -> bool:
        """Whether a call would be let through now: closed, or open past ``reset_s`` (it becomes the trial)."""
        state = self.current_state
        return state == pybreaker.STATE_CLOSED or (state == pybreaker.STATE_OPEN and not self.refusing)


@dataclass
class _Endpoint:
    url: str
    client: Any
    breaker: EndpointBreaker
    protocol: str = "grpc"


class _TransientError(Exception):
    pass


def _is_grpc(client: Any) -> bool:
    return type(client).__module__.startswith("tritonclient.grpc")


class TritonWorker(Worker):
    kind = "triton"

    def __init__(self, settings: ServiceSettings, metrics: ServiceMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self._endpoints: list[_Endpoint] = []
        self._next = 0
        self._in_flight = 0
        self._cards: dict[str, ModelCard] = {}
        self._in_channels: dict[str, int] = {}
        self._discovery: asyncio.Task | None = None
        self._discovery_errors: dict[str, str] = {}  # the last failure per endpoint: startup warning, /readyz

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
            # gRPC: a short reconnect backoff, so a restarted worker is used again within a second
            extra = {"channel_args": _CHANNEL_ARGS} if self.settings.triton_protocol == "grpc" else {}
            self._endpoints.append(_Endpoint(url=url, client=aio.InferenceServerClient(url=url, **extra),
                                             protocol=self.settings.triton_protocol,
                                             breaker=EndpointBreaker(self.settings.breaker_failures,
                                                                     self.settings.breaker_reset_s, url)))
        # The gateway may start before Triton: learn the models in the background until one answers.
        self._discovery = asyncio.create_task(self._discover_models(), name="ponder-triton-discovery")
        wait = self.settings.triton_startup_wait_s
        try:
            await asyncio.wait_for(asyncio.shield(self._discovery), timeout=wait)
        except TimeoutError:
            last = "; ".join(f"{url}: {error}" for url, error in self._discovery_errors.items()) or "no answer"
            LOG.warning("no Triton endpoint answered within %g s (%s); still trying in the background", wait, last)

    async def stop(self) -> None:
        if self._discovery is not None and not self._discovery.done():
            self._discovery.cancel()
        for endpoint in self._endpoints:  # an open client makes Triton wait out its exit timeout
            try:
                await endpoint.client.close()
            except Exception as exc:  # noqa: BLE001 - closing is best effort
                LOG.debug("closing the client of %s: %s", endpoint.url, exc)

    async def _discover_models(self) -> None:
        delay = 0.2
        while not self._cards:
            for endpoint in self._endpoints:
                try:
                    cards = await self._cards_of(endpoint.client)
                except Exception as exc:  # noqa: BLE001 - retried until a server answers
                    LOG.debug("model discovery on %s failed: %s", endpoint.url, exc)
                    self._discovery_errors[endpoint.url] = " ".join(str(exc).split())[:300] or type(exc).__name__
                    continue
                if cards:
                    self._cards = {name: card for name, (card, _) in cards.items()}
                    self._in_channels = {name: channels for name, (_, channels) in cards.items()}
                    LOG.info("Triton at %s serves %s", endpoint.url, ", ".join(self._cards))
                    return
                LOG.warning("Triton at %s serves no ready ponder ensemble yet", endpoint.url)
                self._discovery_errors[endpoint.url] = "serves no ready ponder ensemble yet"
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    @staticmethod
    async def _cards_of(client: Any) -> dict[str, tuple[ModelCard, int]]:
        """Name -> (card, input channels) of every ready ensemble carrying ponder metadata, in index order."""
        from export.triton_repo import config_metadata, parse_config_json

        index = await client.get_model_repository_index(as_json=True) if _is_grpc(client) else \
            await client.get_model_repository_index()
        entries = index.get("models", []) if isinstance(index, dict) else index
        cards = {}
        for entry in entries:
            name = entry.get("name")
            if not name or entry.get("state", "READY") != "READY":
                continue
            raw = await client.get_model_config(name, as_json=True) if _is_grpc(client) else \
                await client.get_model_config(name)
            config = parse_config_json(raw)
            meta = config_metadata(config)
            if config.platform == "ensemble" and "kind" in meta and "out_channels" in meta:
                cards[name] = (card_from_metadata(name, meta), int(meta["in_channels"]))
        return cards

    def models(self) -> dict[str, ModelCard]:
        return self._cards

    async def ready(self) -> tuple[bool, str]:
        if not self._cards:
            last = "; ".join(f"{url}: {error}" for url, error in self._discovery_errors.items())
            return False, "no Triton endpoint has answered the model list yet" + (f" (last: {last})" if last else "")
        for endpoint in self._endpoints:
            if endpoint.breaker.refusing:
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
            if endpoint.breaker.admits():
                return endpoint
        return None

    def _request(self, job: EncodeJob) -> tuple[list, list]:
        """The ensemble's inputs (see the module docstring) and requested outputs; a scene that cannot be
        one is refused here (WorkerInputError), before it reaches a server."""
        module, _ = self._client_module()
        card = self._cards.get(job.model)
        if card is None:
            raise WorkerUnavailable(f"no Triton endpoint has listed model {job.model!r} yet")
        grid = np.ascontiguousarray(job.voxels.grid_coord, dtype=np.int32)  # (M, 3)
        feat = np.ascontiguousarray(job.voxels.feat, dtype=np.float32)  # (M, C)
        channels = self._in_channels.get(job.model, feat.shape[-1])
        if grid.ndim != 2 or grid.shape[1] != 3 or len(grid) == 0 or feat.shape != (len(grid), channels):
            raise WorkerInputError(f"model {job.model!r} takes grid_coord (M, 3) and feat (M, {channels}) with M >= 1; "
                                   f"got {grid.shape} and {feat.shape}")
        tensors = [("grid_coord", grid, "INT32"), ("batch", np.zeros(len(grid), np.int32), "INT32"),
                   ("feat", feat, "FP32")]
        try:
            index = condition_index(card.info.conditions, card.resolve_condition(job.condition))
        except ValueError as exc:
            raise WorkerInputError(str(exc)) from exc
        if index is not None:
            tensors.append(("condition", np.array([index], np.int64), "INT64"))
        http = self.settings.triton_protocol == "http"
        inputs = []
        for name, array, dtype in tensors:
            tensor = module.InferInput(name, list(array.shape), dtype)
            if http:
                tensor.set_data_from_numpy(array, binary_data=True)
            else:
                tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        names = ["backbone_feat"] + (["seg_logits"] if job.want_logits and card.has_classifier else [])
        outputs = [module.InferRequestedOutput(n, binary_data=True) if http else module.InferRequestedOutput(n)
                   for n in names]
        return inputs, outputs

    def _classify_error(self, exc: Exception) -> Exception:
        from tritonclient.utils import InferenceServerException

        if isinstance(exc, InferenceServerException):
            status = str(exc.status() or "")
            text = exc.message() or str(exc)
            message = _short(text)
            if status in _TRANSIENT or not status or _TRANSIENT_TEXT.search(text):  # no status: no connection
                return _TransientError(message)
            if status in _INPUT:
                return WorkerInputError(f"the model server refused the input: {message}")
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
        """One call, retried by tenacity on transient errors (the next endpoint each time, waits of
        ``triton_backoff_s`` doubling per retry); gives up with WorkerUnavailable (503)."""
        attempts = self.settings.triton_retries + 1

        def gave_up(state: tenacity.RetryCallState) -> EncodeOutput:
            raise WorkerUnavailable(f"gave up after {attempts} attempts ({state.outcome.exception()})")

        retrying = tenacity.AsyncRetrying(stop=tenacity.stop_after_attempt(attempts),
                                          wait=tenacity.wait_exponential(multiplier=self.settings.triton_backoff_s),
                                          retry=tenacity.retry_if_exception_type(_TransientError),
                                          retry_error_callback=gave_up)
        return await retrying(self._call_once, job, inputs, outputs)

    async def _call_once(self, job: EncodeJob, inputs: list, outputs: list) -> EncodeOutput:
        endpoint = self._pick()
        if endpoint is None:
            raise _TransientError("every Triton endpoint's circuit breaker is open")
        start = time.perf_counter()
        try:
            with endpoint.breaker.calling():
                try:
                    result = await endpoint.client.infer(job.model, inputs, outputs=outputs)
                except Exception as exc:  # noqa: BLE001 - sorted into input / transient / unexpected
                    error = self._classify_error(exc)
                    if error is exc:
                        raise
                    raise error from exc
        except pybreaker.CircuitBreakerError as exc:  # opened by a concurrent call since _pick
            raise _TransientError(f"{endpoint.url}: {exc}") from exc
        except WorkerInputError:
            raise
        except Exception as error:
            self.metrics.triton_errors.labels(endpoint.url).inc()
            self.metrics.breaker_open.labels(endpoint.url).set(endpoint.breaker.current_state != "closed")
            if isinstance(error, _TransientError):
                LOG.warning("Triton call to %s failed: %s", endpoint.url, error)
                raise _TransientError(f"{endpoint.url}: {error}") from error
            raise
        self.metrics.breaker_open.labels(endpoint.url).set(0)
        self.metrics.worker_latency.labels(self.kind).observe(time.perf_counter() - start)
        self.metrics.batch_size.observe(1)
        self.metrics.voxels.inc(job.voxels.num_voxels)
        features = result.as_numpy("backbone_feat")
        logits = result.as_numpy("seg_logits") if len(outputs) > 1 else None
        return EncodeOutput(features=features, logits=logits)

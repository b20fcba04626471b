"""The Triton worker: the gateway decodes and voxelises, then calls the ensemble of a repository written by
``ponder export triton-repo`` (served by ``ponder worker --triton --repo``) on one of several Triton endpoints,
over gRPC (default) or HTTP with tritonclient's asyncio clients. The request carries what the gateway has:
``grid_coord (M, 3) INT32``, ``batch (M,) INT32``, ``feat (M, C) FP32`` and, for conditional models,
``condition (1,) INT64``; Triton computes the kernel maps and runs the encoder (`export.triton_repo`).

Models: every ready ensemble with ponder metadata in its config parameters (read through the repository
index and the model configs) becomes a model card, in the repository's order, so the gateway needs no
checkpoint and serves the repository's model as its default. Cards are read per endpoint: the first listed
endpoint that answers sets the served cards; an endpoint whose card for a model differs (feature width,
outputs, conditions, ...) is not used for that model and is named in /readyz. An endpoint's cards are read
again by every /readyz, before its next call after a failure, and when it refuses an input or answers with
the wrong shape; once every endpoint with known cards agrees on a new set, the gateway serves that set.
Every answer is checked against the card before it is returned (a mismatch is a 503 naming the endpoint).
The cards, their comparison (weights digest included) and the answer check live in `triton_cards`; each
endpoint's state, its breaker and the sorting of failures in `triton_endpoint`.

Robustness: endpoints are used round-robin; each has a circuit breaker (``breaker_failures`` consecutive
failures open it for ``breaker_reset_s``, then one trial call decides); transient errors (connection,
UNAVAILABLE, a model that is not loaded (yet), a dead Python stub, 5xx) are retried on the next endpoint with
exponential backoff and end as 503 + Retry-After naming each endpoint's last error; input errors are not
retried (422). Each call carries the request's id and deadline (`deadline_parameters`): a scene still queued
in Triton when it passes is skipped there, not computed for nobody, and the step's log line names the id. In-flight requests are bounded by
``queue_size`` (503 beyond it). Readiness and model-list calls are bounded by ``CONTROL_TIMEOUT_S``, so a
stalled server cannot hang /readyz. gRPC channels reconnect within a second once a worker is back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import numpy as np
import pybreaker
import tenacity

from export.scene_request import DEADLINE_PARAMETER
from model.cancel import CancelToken
from model.conditions import condition_index
from service.logs import request_id_var
from service.metrics import ServiceMetrics
from service.settings import ServiceSettings
from service.workers.base import (EncodeJob, EncodeOutput, ModelCard, Worker, WorkerBusy, WorkerInputError,
                                  WorkerUnavailable)
from service.workers.triton_cards import (Served, answer_problem, card_differences, describe_failure, one_line,
                                           served_from_metadata)
from service.workers.triton_endpoint import (CHANNEL_ARGS, Endpoint, EndpointBreaker, TransientError, classify_error,
                                              is_grpc)

LOG = logging.getLogger("service.triton")
# Bound of each readiness / model-list call: a stalled (SIGSTOPped, wedged) server must not hang /readyz,
# and a healthy one answers these in milliseconds.
CONTROL_TIMEOUT_S = 2.0


def deadline_parameters(token: CancelToken | None) -> dict[str, int]:
    """A job's deadline as the Triton steps read it (`export.scene_request`: Unix time in ms), or {} without
    one. Sent per call, since the token's clock (monotonic) means nothing on another host."""
    if token is None or token.deadline is None:
        return {}
    return {DEADLINE_PARAMETER: int((time.time() + token.deadline - time.monotonic()) * 1000)}


class TritonWorker(Worker):
    kind = "triton"

    def __init__(self, settings: ServiceSettings, metrics: ServiceMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self._endpoints: list[Endpoint] = []
        self._next = 0
        self._in_flight = 0
        self._served: dict[str, Served] = {}  # the cards the gateway serves (see the module docstring)
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
            # gRPC: a short reconnect backoff, so a restarted worker is used again within a second
            extra = {"channel_args": CHANNEL_ARGS} if self.settings.triton_protocol == "grpc" else {}
            self._endpoints.append(Endpoint(url=url, client=aio.InferenceServerClient(url=url, **extra),
                                             protocol=self.settings.triton_protocol,
                                             breaker=EndpointBreaker(self.settings.breaker_failures,
                                                                     self.settings.breaker_reset_s, url)))
        # The gateway may start before Triton: learn the models in the background until one answers.
        self._discovery = asyncio.create_task(self._discover_models(), name="ponder-triton-discovery")
        wait = self.settings.triton_startup_wait_s
        try:
            await asyncio.wait_for(asyncio.shield(self._discovery), timeout=wait)
        except TimeoutError:
            LOG.warning("no Triton endpoint answered within %g s (%s); still trying in the background", wait,
                        self._last_errors() or "no answer")

    async def stop(self) -> None:
        if self._discovery is not None and not self._discovery.done():
            self._discovery.cancel()
        for endpoint in self._endpoints:  # an open client makes Triton wait out its exit timeout
            try:
                await endpoint.client.close()
            except Exception as exc:  # noqa: BLE001 - closing is best effort
                LOG.debug("closing the client of %s: %s", endpoint.url, exc)

    def _last_errors(self, endpoints: list[Endpoint] | None = None) -> str:
        return "; ".join(f"{e.url}: {e.last_error}" for e in endpoints or self._endpoints if e.last_error)

    async def _discover_models(self) -> None:
        """Read every endpoint's cards (all at once, each bounded) until one answers; the first listed one that
        did sets the served cards, so the choice does not depend on which server happened to answer first."""
        delay = 0.2
        while not self._served:
            await asyncio.gather(*(self._read_quietly(e) for e in self._endpoints))
            self._reconcile()
            if self._served:
                LOG.info("Triton serves %s (cards from %s)", ", ".join(self._served),
                         next(e.url for e in self._endpoints if e.cards is not None))
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    # -- model cards per endpoint ----------------------------------------------------------------------
    async def _control(self, call: Any, what: str) -> Any:
        """Await a readiness / model-list call for at most CONTROL_TIMEOUT_S (a stalled server never answers)."""
        try:
            return await asyncio.wait_for(call, CONTROL_TIMEOUT_S)
        except TimeoutError:
            raise TimeoutError(f"no answer to {what} within {CONTROL_TIMEOUT_S:g} s (is the server stalled?)") \
                from None

    async def _cards_of(self, client: Any) -> dict[str, Served]:
        """Name -> Served of every ready ensemble carrying ponder metadata, in index order."""
        from export.triton_repo import config_metadata, parse_config_json

        grpc = is_grpc(client)
        index = await self._control(client.get_model_repository_index(**({"as_json": True} if grpc else {})),
                                    "the model list")
        entries = index.get("models", []) if isinstance(index, dict) else index
        cards = {}
        for entry in entries:
            name = entry.get("name")
            if not name or entry.get("state", "READY") != "READY":
                continue
            raw = await self._control(client.get_model_config(name, **({"as_json": True} if grpc else {})),
                                      f"the config of {name!r}")
            config = parse_config_json(raw)
            meta = config_metadata(config)
            if config.platform == "ensemble" and "kind" in meta and "out_channels" in meta:
                cards[name] = served_from_metadata(name, meta)
        return cards

    async def _read(self, endpoint: Endpoint) -> None:
        """Read the endpoint's cards again (raises on failure; then the endpoint stays stale)."""
        async with endpoint.lock:
            try:
                cards = await self._cards_of(endpoint.client)
                if not cards:
                    raise TransientError("serves no ready ponder ensemble yet")
            except Exception as exc:
                endpoint.stale, endpoint.last_error = True, describe_failure(endpoint.url, endpoint.protocol, exc)
                raise
            endpoint.cards, endpoint.stale = cards, False

    async def _read_quietly(self, endpoint: Endpoint) -> bool:
        """_read, for discovery and after a suspicious answer: a failure is kept in ``last_error``."""
        try:
            await self._read(endpoint)
            return True
        except Exception as exc:  # noqa: BLE001 - retried later; the error is in last_error
            LOG.debug("model list of %s: %s", endpoint.url, exc)
            return False

    async def _refresh(self, endpoint: Endpoint) -> None:
        await self._read(endpoint)
        self._reconcile()

    def _reconcile(self) -> None:
        """Apply the card rule after a read: the first cards read are served; later, a set that every endpoint
        with known cards agrees on replaces them (a redeployed worker); an endpoint whose card for a model
        differs from the served one is excluded from that model, logged once per reason."""
        known = [e.cards for e in self._endpoints if e.cards is not None]
        if not known:
            return
        if not self._served:
            self._adopt(known[0])
        elif known[0] != self._served and all(cards == known[0] for cards in known):
            LOG.warning("every Triton endpoint with known models now serves %s, unlike before (%s); serving "
                        "the new model cards", ", ".join(known[0]), self._changes(known[0]))
            self._adopt(known[0])
        for endpoint in self._endpoints:
            excluded = {}
            for name, served in self._served.items():
                if endpoint.cards is None:
                    continue
                mine = endpoint.cards.get(name)
                if mine != served:
                    excluded[name] = "does not serve it" if mine is None else card_differences(mine, served)
            for name, why in excluded.items():
                if endpoint.excluded.get(name) != why:
                    LOG.warning("Triton endpoint %s is not used for model %r: %s", endpoint.url, name, why)
            endpoint.excluded = excluded

    def _adopt(self, cards: dict[str, Served]) -> None:
        self._served = dict(cards)
        self._cards = {name: served.card for name, served in cards.items()}

    def _changes(self, cards: dict[str, Served]) -> str:
        changed = [f"{name}: {card_differences(cards[name], self._served[name])}" for name in cards
                   if name in self._served and cards[name] != self._served[name]]
        gone = [name for name in self._served if name not in cards]
        return "; ".join(changed + ([f"gone: {', '.join(gone)}"] if gone else [])) or "other models"

    def models(self) -> dict[str, ModelCard]:
        return self._cards

    # -- readiness ---------------------------------------------------------------------------------------
    async def _endpoint_ready(self, endpoint: Endpoint) -> str | None:
        """None when the endpoint is ready (its cards read again on the way), else why not; bounded."""
        if endpoint.breaker.refusing:
            return f"circuit breaker open (last error: {endpoint.last_error or 'unknown'})"
        try:
            if not await self._control(endpoint.client.is_server_ready(), "the readiness check"):
                raise TransientError("the server says it is not ready")
            await self._refresh(endpoint)
        except Exception as exc:  # noqa: BLE001 - an unreachable endpoint is simply not ready
            endpoint.stale, endpoint.last_error = True, describe_failure(endpoint.url, endpoint.protocol, exc)
            LOG.debug("readiness of %s: %s", endpoint.url, exc)
            return endpoint.last_error
        return None

    async def ready(self) -> tuple[bool, str]:
        if not self._served:
            last = self._last_errors()
            return False, "no Triton endpoint has answered the model list yet" + (f" (last: {last})" if last else "")
        problems = await asyncio.gather(*(self._endpoint_ready(e) for e in self._endpoints))
        usable = [e.url for e, problem in zip(self._endpoints, problems)
                  if problem is None and len(e.excluded) < len(self._served)]
        notes = [f"{e.url}: {problem}" for e, problem in zip(self._endpoints, problems) if problem is not None]
        notes += [f"{e.url} is not used for model {name!r}: {why}" for e in self._endpoints
                  for name, why in e.excluded.items()]
        suffix = f" ({'; '.join(notes)})" if notes else ""
        if usable:
            return True, f"Triton endpoint{'s' if len(usable) > 1 else ''} {', '.join(usable)} ready{suffix}"
        return False, f"no Triton endpoint is ready{suffix}"

    def queue_depth(self) -> int:
        return self._in_flight

    # -- inference ---------------------------------------------------------------------------------------
    def _usable(self, model: str, expected: Served) -> list[Endpoint]:
        """Endpoints a request prepared for ``expected`` may go to: same card, or cards to be read first."""
        return [e for e in self._endpoints if e.stale or (e.cards or {}).get(model) == expected]

    def _pick(self, model: str, expected: Served) -> Endpoint:
        """The next endpoint in round-robin order that serves ``model`` as ``expected`` (or whose cards are to
        be read again) and whose breaker lets a call through; else TransientError saying why none does."""
        usable = self._usable(model, expected)
        if not usable:
            why = "; ".join(f"{e.url}: " + ("does not serve it" if model not in (e.cards or {})
                                            else card_differences(e.cards[model], expected))
                            for e in self._endpoints)
            raise WorkerUnavailable(f"no Triton endpoint serves model {model!r} with the card this request was "
                                    f"prepared for ({why}); a retry uses the gateway's current card")
        for _ in range(len(self._endpoints)):
            endpoint = self._endpoints[self._next % len(self._endpoints)]
            self._next += 1
            if endpoint in usable and endpoint.breaker.admits():
                return endpoint
        last = self._last_errors(usable)
        raise TransientError("every Triton endpoint's circuit breaker is open" + (f"; last: {last}" if last else ""))

    def _request(self, job: EncodeJob) -> tuple[list, list, Served]:
        """The ensemble's inputs (see the module docstring), requested outputs and the entry they were built
        from; a scene that cannot be one is refused here (WorkerInputError), before it reaches a server."""
        module, _ = self._client_module()
        served = self._served.get(job.model)
        if served is None:
            raise WorkerUnavailable(f"no Triton endpoint has listed model {job.model!r} yet")
        card = served.card
        grid = np.ascontiguousarray(job.voxels.grid_coord, dtype=np.int32)  # (M, 3)
        feat = np.ascontiguousarray(job.voxels.feat, dtype=np.float32)  # (M, C)
        channels = served.in_channels
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
        return inputs, outputs, served

    async def run(self, job: EncodeJob) -> EncodeOutput:
        if self._in_flight >= self.settings.queue_size:
            self.metrics.rejected.inc()
            raise WorkerBusy(f"{self._in_flight} requests are already waiting for Triton; retry shortly")
        inputs, outputs, served = self._request(job)
        self._in_flight += 1
        self.metrics.queue_depth.set(self._in_flight)
        try:
            return await self._call_with_retries(job, inputs, outputs, served)
        finally:
            self._in_flight -= 1
            self.metrics.queue_depth.set(self._in_flight)

    async def _call_with_retries(self, job: EncodeJob, inputs: list, outputs: list, served: Served) -> EncodeOutput:
        """One call, retried by tenacity on transient errors (the next endpoint each time, waits of
        ``triton_backoff_s`` doubling per retry); gives up with WorkerUnavailable (503)."""
        attempts = self.settings.triton_retries + 1

        def gave_up(state: tenacity.RetryCallState) -> EncodeOutput:
            raise WorkerUnavailable(f"gave up after {attempts} attempts ({state.outcome.exception()})")

        retrying = tenacity.AsyncRetrying(stop=tenacity.stop_after_attempt(attempts),
                                          wait=tenacity.wait_exponential(multiplier=self.settings.triton_backoff_s),
                                          retry=tenacity.retry_if_exception_type(TransientError),
                                          retry_error_callback=gave_up)
        return await retrying(self._call_once, job, inputs, outputs, served)

    async def _now_differs(self, endpoint: Endpoint, model: str, expected: Served) -> str | None:
        """Read the endpoint's cards again after a suspicious answer: how its ``model`` now differs, if it does."""
        if not await self._read_quietly(endpoint):
            return None
        self._reconcile()
        mine = endpoint.cards.get(model) if endpoint.cards else None
        if mine == expected:
            return None
        if mine is None:
            return "no longer serves it"
        return f"now serves another model ({card_differences(mine, expected)})"

    async def _call_once(self, job: EncodeJob, inputs: list, outputs: list, served: Served) -> EncodeOutput:
        endpoint = self._pick(job.model, served)
        start = time.perf_counter()
        other = None
        try:
            with endpoint.breaker.calling():
                try:
                    if endpoint.stale:  # failed since its cards were read (or never read): a worker may be new
                        await self._refresh(endpoint)
                    mine = (endpoint.cards or {}).get(job.model)
                    if mine != served:
                        other = "does not serve it" if mine is None else card_differences(mine, served)
                        result = None
                    else:
                        result = await endpoint.client.infer(job.model, inputs, outputs=outputs,
                                                             request_id=request_id_var.get() or "",
                                                             parameters=deadline_parameters(job.cancel) or None)
                except Exception as exc:  # noqa: BLE001 - sorted into input / transient / unexpected
                    error = classify_error(exc)
                    if error is exc:
                        raise
                    raise error from exc
        except pybreaker.CircuitBreakerError as exc:  # opened by a concurrent call since _pick
            raise TransientError(f"{endpoint.url}: {exc}") from exc
        except WorkerInputError as exc:
            # the gateway checked the input against its card: a refusal may mean the worker was redeployed
            changed = await self._now_differs(endpoint, job.model, served)
            if changed:
                raise TransientError(f"{endpoint.url} {changed}; not the input's fault") from exc
            raise
        except Exception as error:
            self.metrics.triton_errors.labels(endpoint.url).inc()
            self.metrics.breaker_open.labels(endpoint.url).set(endpoint.breaker.current_state != "closed")
            if isinstance(error, TransientError):
                LOG.warning("Triton call to %s failed: %s", endpoint.url, error)
                endpoint.stale, endpoint.last_error = True, one_line(error)
                raise TransientError(f"{endpoint.url}: {error}") from error
            raise
        if other is not None:
            raise TransientError(f"{endpoint.url} is not used for model {job.model!r}: {other}")
        self.metrics.breaker_open.labels(endpoint.url).set(0)
        features = result.as_numpy("backbone_feat")
        logits = result.as_numpy("seg_logits") if len(outputs) > 1 else None
        problem = answer_problem(job, served, features, logits, len(outputs) > 1)
        if problem is not None:  # never a 200 with another model's numbers
            self.metrics.triton_errors.labels(endpoint.url).inc()
            changed = await self._now_differs(endpoint, job.model, served)
            message = f"{endpoint.url} answered {problem}" + (f"; it {changed}" if changed else "")
            LOG.warning("Triton endpoint %s: %s", endpoint.url, message)
            endpoint.last_error = message
            if not self._usable(job.model, served):  # no endpoint left for this request's card: say why now
                raise WorkerUnavailable(message + ("; retry: the gateway serves its new model card now"
                                                   if self._served.get(job.model) != served else ""))
            raise TransientError(message)
        self.metrics.worker_latency.labels(self.kind).observe(time.perf_counter() - start)
        self.metrics.batch_size.observe(1)
        self.metrics.voxels.inc(job.voxels.num_voxels)
        return EncodeOutput(features=features, logits=logits)

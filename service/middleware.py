"""Pure-ASGI middleware (no BaseHTTPMiddleware, so streamed bodies and answers pass through untouched):

* :class:`RequestContextMiddleware` — request id (the client's ``X-Request-ID`` or a new one) on every
  answer and log line, one JSON access-log line per request, and the HTTP metrics;
* :class:`BodyLimitMiddleware` — refuses bodies over the limit with 413 from ``Content-Length`` at once,
  or, for chunked uploads, as soon as the bytes read pass the limit, a body that stalls or trickles under a
  rate floor with 408, and bytes
  that would take what all requests in flight hold past their budget with 503 + Retry-After;
* :class:`AuthMiddleware` — optional API keys (401 missing / 403 wrong) and a per-key token bucket (429).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import re
import threading
import time
import uuid
from dataclasses import dataclass

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import ApiError, problem_response
from service.logs import request_id_var
from service.metrics import ServiceMetrics

ACCESS_LOG = logging.getLogger("service.access")
_VALID_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


def _route_label(scope: Scope) -> str:
    """The matched route template (bounded label set); unmatched paths share one label."""
    route = scope.get("route")
    return getattr(route, "path", None) or "<unmatched>"


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = Headers(scope=scope).get("x-request-id", "")
        request_id = given if _VALID_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        token = request_id_var.set(request_id)
        status = 500
        sent_bytes = 0
        start = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status, sent_bytes
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                headers.append((b"x-request-id", request_id.encode()))
                message = {**message, "headers": headers}
            elif message["type"] == "http.response.body":
                sent_bytes += len(message.get("body", b""))
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - start
            route = _route_label(scope)
            self.metrics.in_flight.dec()
            self.metrics.requests.labels(route, scope["method"], str(status)).inc()
            self.metrics.latency.labels(route, str(status)).observe(elapsed)
            ACCESS_LOG.info("%s %s %d", scope["method"], scope["path"], status,
                            extra={"method": scope["method"], "path": scope["path"], "status": status,
                                   "duration_ms": round(elapsed * 1000, 2), "response_bytes": sent_bytes,
                                   "client": (scope.get("client") or ("?",))[0]})
            request_id_var.reset(token)


class UploadBudget:
    """Bytes of request bodies held by requests in flight, against a budget: lane places are taken only once a
    body is in (so a stalled client holds none), which leaves this as the bound on how much memory many
    concurrent uploads can pin. Used from the event loop only: no lock."""

    def __init__(self, max_bytes: int | None) -> None:
        self.max_bytes = max_bytes
        self.held = 0

    def take(self, size: int) -> bool:
        if self.max_bytes is not None and size > 0 and self.held + size > self.max_bytes:
            return False
        self.held += size
        return True

    def give_back(self, size: int) -> None:
        self.held -= size

    def refusal(self, size: int) -> ApiError:
        return ApiError(503, f"the server is holding {self.held} bytes of other uploads and {size} more would pass "
                             f"its budget of {self.max_bytes} bytes (PONDER_MAX_INFLIGHT_UPLOAD_BYTES); retry shortly",
                        headers={"Retry-After": "2", "Connection": "close"})


class BodyLimitMiddleware:
    """Upload limits while the body arrives: its size (413), the longest wait for its next bytes and the
    lowest average rate (408, so a stalled or trickling client does not keep a connection and a deadline
    running) and the bytes all requests in flight
    hold (503, `UploadBudget`: counted as they arrive, given back when the request has been answered). Bytes
    received, not declared: a client declaring a huge Content-Length and trickling would otherwise hold a
    share of the budget it never uses."""

    def __init__(self, app: ASGIApp, max_bytes: int, idle_timeout_s: float | None = None,
                 max_inflight_bytes: int | None = None, min_bytes_per_s: float = 0.0) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.idle_timeout_s = idle_timeout_s
        self.min_bytes_per_s = min_bytes_per_s
        self.budget = UploadBudget(max_inflight_bytes)

    def _check_rate(self, received: int, elapsed: float) -> None:
        """408 for an upload whose average rate is under the floor once its first ``idle_timeout_s`` is over
        (a slow start is no trickle). Judged as bytes arrive: the idle limit covers the gaps between them, so a
        client sending a byte just inside each idle window is refused within two windows."""
        if self.min_bytes_per_s <= 0 or self.idle_timeout_s is None or elapsed < self.idle_timeout_s:
            return
        if received < self.min_bytes_per_s * elapsed:
            raise ApiError(408, f"the upload arrives at {received / elapsed:.0f} bytes/s ({received} bytes in "
                                f"{elapsed:.0f} s), under the floor of {self.min_bytes_per_s:g} bytes/s "
                                "(PONDER_UPLOAD_MIN_BYTES_PER_S)", headers={"Connection": "close"})

    def _too_large(self, size: str) -> ApiError:
        return ApiError(413, f"request body {size} exceeds the limit of {self.max_bytes} bytes "
                             f"(PONDER_MAX_UPLOAD_BYTES)")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_bytes:
            err = self._too_large(f"of {int(declared)} bytes")
            response = problem_response(413, err.detail, scope.get("state", {}).get("request_id"),
                                        headers={"Connection": "close"})
            await response(scope, receive, send)
            return
        received = 0
        held = 0  # bytes of the budget this request holds
        body_done = False
        started = time.monotonic()

        async def counting_receive() -> Message:
            nonlocal received, body_done, held
            if body_done or self.idle_timeout_s is None:  # after the body only a disconnect can come: no limit
                message = await receive()
            else:
                try:  # asyncio.timeout, not wait_for: nested in a request's deadline, each knows its own expiry
                    async with asyncio.timeout(self.idle_timeout_s):
                        message = await receive()
                except TimeoutError:
                    raise ApiError(408, f"no upload bytes arrived for {self.idle_timeout_s:g} s after {received} "
                                        "bytes (PONDER_UPLOAD_IDLE_TIMEOUT_S); send the body without pauses",
                                   headers={"Connection": "close"}) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if received > self.max_bytes:
                    raise self._too_large(f"(more than {received} bytes read)")
                if not body_done:
                    self._check_rate(received, time.monotonic() - started)
                if not self.budget.take(received - held):
                    raise self.budget.refusal(received - held)
                held = received
            return message

        try:
            await self.app(scope, counting_receive, send)
        finally:
            self.budget.give_back(held)


@dataclass
class _Bucket:
    tokens: float
    stamp: float


class TokenBuckets:
    """One token bucket per key: ``rate`` tokens a second up to ``burst``. Thread-safe. Past ``max_keys``
    keys (many client addresses), buckets that have refilled completely are forgotten: they hold no state.

    Kept by hand rather than taken from ``limits``: that library offers fixed, moving and sliding windows of an
    integer count per whole-second window on the wall clock, not a token bucket; the settings promise a
    fractional refill rate (``PONDER_RATE_LIMIT_PER_S`` = 0.5 is valid) with a separate burst, and Retry-After
    is the exact wait for the next token, which no window strategy reproduces (after a burst a window refuses
    for the whole window, a bucket for ``1 / rate``). ``take(now=...)`` lets tests drive the clock."""

    def __init__(self, rate: float, burst: int, max_keys: int = 10_000) -> None:
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()

    def _prune(self, now: float) -> None:
        full = [k for k, b in self._buckets.items() if b.tokens + (now - b.stamp) * self.rate >= self.burst]
        for key in full:
            del self._buckets[key]

    def take(self, key: str, now: float | None = None) -> float:
        """Take one token; returns 0 when allowed, else the seconds until a token is available."""
        now = time.monotonic() if now is None else now
        with self._lock:
            bucket = self._buckets.get(key)
            if bucket is None:
                if len(self._buckets) >= self.max_keys:
                    self._prune(now)
                bucket = self._buckets[key] = _Bucket(float(self.burst), now)
            bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.stamp) * self.rate)
            bucket.stamp = now
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return 0.0
            return (1.0 - bucket.tokens) / self.rate


class AuthMiddleware:
    """Guards the API routes (``/v1/...``); health, metrics and docs stay open."""

    def __init__(self, app: ASGIApp, api_keys: list[str], rate_per_s: float, burst: int,
                 protected_prefix: str = "/v1/") -> None:
        self.app = app
        self.api_keys = [k.encode() for k in api_keys]
        self.buckets = TokenBuckets(rate_per_s, burst) if rate_per_s > 0 else None
        self.prefix = protected_prefix

    def _key_of(self, headers: Headers) -> str | None:
        key = headers.get("x-api-key")
        if key:
            return key
        auth = headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            return auth[7:].strip() or None
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(self.prefix):
            await self.app(scope, receive, send)
            return
        request_id = scope.get("state", {}).get("request_id")
        headers = Headers(scope=scope)
        key = self._key_of(headers)
        if self.api_keys:
            if key is None:
                await problem_response(401, "missing API key: send it as 'X-API-Key: KEY' or "
                                            "'Authorization: Bearer KEY'", request_id,
                                       headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
                return
            if not any(hmac.compare_digest(key.encode(), good) for good in self.api_keys):
                await problem_response(403, "the API key is not valid", request_id)(scope, receive, send)
                return
        if self.buckets is not None:
            client = key if (self.api_keys and key) else (scope.get("client") or ("anonymous",))[0]
            wait = self.buckets.take(client)
            if wait > 0:
                retry = max(1, math.ceil(wait))
                await problem_response(429, f"rate limit of {self.buckets.rate:g} requests/s "
                                            f"(burst {self.buckets.burst}) exceeded; retry in {retry} s",
                                       request_id, headers={"Retry-After": str(retry)})(scope, receive, send)
                return
        await self.app(scope, receive, send)

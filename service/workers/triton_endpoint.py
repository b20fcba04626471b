"""One Triton endpoint as the gateway sees it (`Endpoint`, its circuit breaker) and how a failed call to it is
sorted: transient (retried on the next endpoint, then 503), the input's fault (422) or unexpected (500).
`service.workers.triton_client` owns the calls; this module owns what it knows about each server."""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import pybreaker

from service.workers.base import WorkerFailed, WorkerInputError
from service.workers.triton_cards import Served

_TRANSIENT = {"StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED", "StatusCode.RESOURCE_EXHAUSTED",
              "StatusCode.ABORTED", "StatusCode.CANCELLED", "StatusCode.NOT_FOUND", "429", "502", "503", "504"}
_INPUT = {"StatusCode.INVALID_ARGUMENT", "StatusCode.FAILED_PRECONDITION", "StatusCode.OUT_OF_RANGE", "400"}
# A model that is not (yet / any more) loaded or a stub that died reads like this whatever the status says;
# the gateway checked the model name against the server's own list, so none of them is the input's fault.
_TRANSIENT_TEXT = re.compile(r"unknown model|is not ready|no available versions|is not healthy|stub process|"
                             r"server is stopping|socket closed|"
                             r"the caller's deadline passed", re.IGNORECASE)  # export.scene_request: clock skew
_EXCEPTION_LINE = re.compile(r"^\s*(?:\w+\.)*\w*(?:Error|Exception): .+$", re.MULTILINE)
CHANNEL_ARGS = [("grpc.max_send_message_length", 2**31 - 1), ("grpc.max_receive_message_length", 2**31 - 1),
                 ("grpc.initial_reconnect_backoff_ms", 200), ("grpc.min_reconnect_backoff_ms", 200),
                 ("grpc.max_reconnect_backoff_ms", 1000), ("grpc.keepalive_time_ms", 2**31 - 1)]


def short_error(message: str) -> str:
    """The last ``SomeError: text`` line of a server-side traceback (the whole message if none)."""
    lines = [m.group(0).strip() for m in _EXCEPTION_LINE.finditer(message)]
    return lines[-1] if lines else message.strip()[:500]


class TransientError(Exception):
    """A failure the next endpoint (or a later try) may not have: retried, then a 503."""


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
class Endpoint:
    """One Triton server the gateway calls, with its breaker and what the gateway last learned of it."""

    url: str
    client: Any
    breaker: EndpointBreaker
    protocol: str = "grpc"
    cards: dict[str, Served] | None = None  # last read; None until the endpoint has listed its models
    stale: bool = True  # read the cards again before the next call (never read, or failed since)
    last_error: str = ""  # the last failure, one short line: 503 bodies and /readyz
    excluded: dict[str, str] = field(default_factory=dict)  # model -> why this endpoint is not used for it
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one card read at a time


def is_grpc(client: Any) -> bool:
    return type(client).__module__.startswith("tritonclient.grpc")


def classify_error(exc: Exception) -> Exception:
    """The error a failed Triton call stands for: `TransientError` (retried on the next endpoint),
    WorkerInputError (422), WorkerFailed (500), or ``exc`` itself when it is none of those."""
    from tritonclient.utils import InferenceServerException

    if isinstance(exc, InferenceServerException):
        status = str(exc.status() or "")
        text = exc.message() or str(exc)
        message = short_error(text)
        if status in _TRANSIENT or not status or _TRANSIENT_TEXT.search(text):  # no status: no connection
            return TransientError(message)
        if status in _INPUT:
            return WorkerInputError(f"the model server refused the input: {message}")
        return WorkerFailed(f"{status}: {message}")
    if isinstance(exc, (OSError, TimeoutError, asyncio.TimeoutError)):
        return TransientError(f"{type(exc).__name__}: {exc}")
    try:
        import aiohttp

        if isinstance(exc, aiohttp.ClientError):
            return TransientError(f"{type(exc).__name__}: {exc}")
    except ImportError:
        pass
    return exc

"""Cooperative cancellation for long model work (rendering, precise segmentation): a :class:`CancelToken`
carries a deadline and a cancel flag; loops call ``token.check()`` (or :func:`checkpoint`, which checks the
token made active for the current context) between chunks, and it raises :class:`Cancelled` once the
deadline passed or someone called ``cancel``. Python threads cannot be interrupted, so this is how a caller
(the service's model thread) gets its thread back within one chunk of a deadline.

    token = CancelToken.after(30.0)
    with active(token):
        render_views_of(...)     # the renderer calls checkpoint() before every ray chunk
"""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager


class Cancelled(Exception):
    """The work was cancelled or ran past its deadline; ``reason`` says which."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class CancelToken:
    """A deadline (``time.monotonic()`` seconds, or None) and a flag any thread may set. Thread-safe."""

    def __init__(self, deadline: float | None = None) -> None:
        self.deadline = deadline
        self._event = threading.Event()
        self._reason = ""

    @classmethod
    def after(cls, seconds: float | None) -> "CancelToken":
        return cls(None if seconds is None else time.monotonic() + seconds)

    def cancel(self, reason: str = "cancelled") -> None:
        if not self._event.is_set():
            self._reason = reason
            self._event.set()

    @property
    def cancelled(self) -> bool:
        """Cancelled explicitly or past the deadline."""
        return self._event.is_set() or self.expired

    @property
    def expired(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    @property
    def reason(self) -> str:
        if self._event.is_set():
            return self._reason
        return "deadline passed" if self.expired else ""

    def check(self) -> None:
        """Raise Cancelled when cancelled or past the deadline; cheap enough to call per chunk."""
        if self.cancelled:
            raise Cancelled(self.reason)


class AllCancelled:
    """Cancelled once every one of ``tokens`` is: the token of a batch that serves several requests, which stops
    only when none of them still waits for it. Same reading interface as `CancelToken`."""

    def __init__(self, tokens: list[CancelToken]) -> None:
        self.tokens = list(tokens)

    @property
    def cancelled(self) -> bool:
        return bool(self.tokens) and all(t.cancelled for t in self.tokens)

    @property
    def reason(self) -> str:
        return "; ".join(sorted({t.reason for t in self.tokens})) if self.cancelled else ""

    def check(self) -> None:
        if self.cancelled:
            raise Cancelled(self.reason)


_CURRENT: contextvars.ContextVar[CancelToken | AllCancelled | None] = contextvars.ContextVar("ponder_cancel_token", default=None)


def current() -> CancelToken | AllCancelled | None:
    """The token made active for this context (None outside :func:`active`)."""
    return _CURRENT.get()


@contextmanager
def active(token: CancelToken | AllCancelled | None) -> Iterator[CancelToken | AllCancelled | None]:
    """Make ``token`` the one :func:`checkpoint` checks in this context (None: keep the current one)."""
    if token is None:
        yield current()
        return
    reset = _CURRENT.set(token)
    try:
        yield token
    finally:
        _CURRENT.reset(reset)


def checkpoint() -> None:
    """Raise Cancelled if the active token is cancelled or past its deadline; nothing without one."""
    token = _CURRENT.get()
    if token is not None:
        token.check()

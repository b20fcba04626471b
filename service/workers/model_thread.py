"""A model thread: one daemon thread that runs submitted model calls in order and knows the deadline of the
running one, so the worker can report a pass that overran it (a forward pass cannot be interrupted).

``thread_per_call`` runs each call on a fresh thread that ends with it. A thread running torch ops with more
than one thread owns an OpenMP team, and while libgomp manages more team threads than there are cores it
sleeps between parallel regions instead of spinning: a long-lived second team made every fast-lane forward of
the room on 2 cores 1.7 s → 2.9 s; a team that goes with its call costs 1.88 → 1.92 s
(bench/service_lanes.py)."""

from __future__ import annotations

import concurrent.futures
import queue
import threading
from typing import Any, Callable

from model.devices import use_torch_threads


class ModelThread:
    """One daemon thread running submitted calls in order, recording the deadline of the running one.

    ``torch_threads`` (None: leave torch alone) is set in the thread that runs the calls (torch's counts are
    per thread: `model.devices.use_torch_threads`). ``thread_per_call``: each call runs on a new thread that
    ends with it (see the module: its OpenMP team goes with it)."""

    def __init__(self, name: str, torch_threads: int | None = None, thread_per_call: bool = False) -> None:
        self.name = name
        self.torch_threads = torch_threads
        self.thread_per_call = thread_per_call
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self.deadline: float | None = None  # of the running call (time.monotonic), None when idle
        self.busy = False
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], Any], deadline: float | None) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._calls.put((future, fn, deadline))
        return future

    def _set_torch_threads(self) -> None:
        if self.torch_threads is not None:
            use_torch_threads(self.torch_threads)

    def _in_fresh_thread(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` on a new thread that ends with it: its OpenMP team (and libgomp's count of managed threads)
        goes when the thread does."""
        outcome: dict[str, Any] = {}

        def call() -> None:
            self._set_torch_threads()
            try:
                outcome["value"] = fn()
            except BaseException as exc:  # noqa: BLE001 - re-raised on the model thread
                outcome["error"] = exc

        thread = threading.Thread(target=call, name=f"{self.name}-call", daemon=True)
        thread.start()
        thread.join()
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]

    def _serve(self) -> None:
        if not self.thread_per_call:
            self._set_torch_threads()
        while (item := self._calls.get()) is not None:
            future, fn, deadline = item
            if not future.set_running_or_notify_cancel():
                continue
            self.busy, self.deadline = True, deadline
            try:
                future.set_result(self._in_fresh_thread(fn) if self.thread_per_call else fn())
            except BaseException as exc:  # noqa: BLE001 - delivered to the waiting request
                future.set_exception(exc)
            finally:
                self.busy, self.deadline = False, None

    def overdue(self, now: float) -> float:
        """Seconds the running call is past its deadline (0 when idle or on time)."""
        deadline = self.deadline
        return max(0.0, now - deadline) if self.busy and deadline is not None else 0.0

    def close(self, timeout: float) -> bool:
        """Ask the thread to end after its current call; True when it did within ``timeout``."""
        self._calls.put(None)
        self._thread.join(timeout)
        return not self._thread.is_alive()

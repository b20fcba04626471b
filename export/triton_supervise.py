"""Supervising a running tritonserver (`export.triton_serve.serve_repository` starts it): its process group
read from /proc, the Python stubs it forked, its log relayed line by line, and how it ended.

Triton 2.51 never restarts a Python stub that died (OOM kill, kill -9); it keeps answering health 200 while every
request fails "Stub process ... is not healthy". So once the server is ready, `StubWatch` checks its stubs every
``WATCH_INTERVAL_S``; a stub that is gone or a zombie makes `Supervisor` stop the server (the same path as
SIGTERM) and the worker return ``EXIT_STUB_DIED``, for compose's or Kubernetes' restart. `TritonLog` keeps the
error lines, so that a failed start ends with one line naming the first real error instead of Triton's generic
"failed to load all models". Shared-memory regions are remembered while stubs live, because a dead stub's command
line is empty and a killed server or stub cannot remove its region.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

LOG = logging.getLogger("export.triton")
EXIT_STUB_DIED = 75  # EX_TEMPFAIL: a Python stub died; restarting the worker is the fix
WATCH_INTERVAL_S = 1.0
LOADING_ZOMBIE_S = 10.0  # a stub unreaped this long before readiness crashed at start (see lost_while_loading)
_SHM_PREFIX = "triton_python_backend_shm_region_"
_STUB_BINARY = "triton_python_backend_stub"

def kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


@dataclass(frozen=True)
class _Member:
    """One process of the server's group, read from /proc."""

    pid: int
    zombie: bool
    args: tuple[str, ...]
    comm: str = ""  # the kernel's (15-character) process name: all a zombie still has


def _group_members(pgid: int) -> list[_Member]:
    """The processes of group ``pgid`` (a zombie's command line is empty)."""
    members = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[2]) != pgid:
                continue
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        decoded = tuple(a.decode(errors="replace") for a in args if a)
        members.append(_Member(int(entry.name), fields[0] == "Z", decoded, stat[stat.find("(") + 1:stat.rfind(")")]))
    return members


def _regions_in(args: tuple[str, ...]) -> set[str]:
    return {a for a in args if a.startswith(_SHM_PREFIX)}


def shm_regions(pgid: int) -> set[str]:
    """Shared-memory region names on the command lines of the live processes of group ``pgid``."""
    return {name for member in _group_members(pgid) for name in _regions_in(member.args)}


@dataclass(frozen=True)
class Stub:
    """A Python-backend stub: ``triton_python_backend_stub MODEL_FILE REGION ... INSTANCE ...``."""

    pid: int
    model: str
    instance: str

    @classmethod
    def parse(cls, pid: int, args: tuple[str, ...]) -> "Stub | None":
        if not args or not args[0].endswith(_STUB_BINARY) or len(args) < 9:
            return None
        return cls(pid, Path(args[1]).parent.parent.name, args[8])


class StubWatch:
    """The Python stubs of one server's process group. Remembers every shared-memory region seen (a dead stub's
    command line is empty, so its region can only be named from earlier), and once `arm`-ed at readiness
    reports a watched stub that is gone or a zombie. Stubs come and go while models load (config auto-complete
    runs a short-lived one), so only those alive when armed, or born later, are watched."""

    def __init__(self, pgid: int) -> None:
        self.pgid = pgid
        self.regions: set[str] = set()
        self.watched: dict[int, Stub] | None = None
        self.seen: dict[int, Stub] = {}  # every stub seen alive: names a zombie's model
        self.zombie_since: dict[int, float] = {}

    def arm(self) -> None:
        self.watched = {}
        self.check()

    def check(self) -> Stub | None:
        """Record what lives now; the first watched stub that died, or None."""
        members = {m.pid: m for m in _group_members(self.pgid)}
        self.regions |= _read_mapped_regions(self.pgid)
        for member in members.values():
            self.regions |= _regions_in(member.args)
            stub = Stub.parse(member.pid, member.args)
            if stub and not member.zombie:
                self.seen[stub.pid] = stub
                if self.watched is not None:
                    self.watched.setdefault(stub.pid, stub)
            if member.zombie and member.comm.startswith(_STUB_BINARY[:15]):
                self.zombie_since.setdefault(member.pid, time.monotonic())
        for pid, stub in (self.watched or {}).items():
            if pid not in members or members[pid].zombie:
                return stub
        return None

    def lost_while_loading(self, grace_s: float = LOADING_ZOMBIE_S) -> Stub | None:
        """A stub left a zombie for ``grace_s`` before the server was ready: it crashed at start (e.g. on a model
        name with a space, ``stol``) and Triton 2.51 then waits for it for ever without a word. Stubs that
        finish normally while models load (config auto-complete) are reaped at once."""
        now = time.monotonic()
        for pid, since in self.zombie_since.items():
            if now - since >= grace_s:
                return self.seen.get(pid, Stub(pid, "unknown", "unknown"))
        return None


def _read_mapped_regions(pid: int) -> set[str]:
    """Regions the server itself maps: it holds one per stub, also while that stub is already dead."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return set()
    return set(re.findall(rf"/dev/shm/({_SHM_PREFIX}[\w-]+)", maps))


_TRITON_LINE = re.compile(r"^([EWI])\d{4} [\d:.]+ +\d+ [^\]]+\] (.*)$")
_HARMLESS = ("CudaDriverHelper has not been initialized", "unable to create stream for",
             "CUDA driver version is insufficient")  # logged by every start on a machine without a GPU


class TritonLog:
    """Relays the server's stderr to ours line by line (never stops reading: a full pipe would block Triton)
    and keeps the error lines, so that a failed start can end with the first one that says why."""

    def __init__(self, stream: IO[bytes], sink: IO[bytes] | None = None) -> None:
        self.errors: list[str] = []
        self._stream, self._sink = stream, sink
        self._thread = threading.Thread(target=self._relay, name="tritonserver-log", daemon=True)
        self._thread.start()

    def _relay(self) -> None:
        for raw in iter(self._stream.readline, b""):
            try:
                sink = self._sink or sys.stderr.buffer
                sink.write(raw)
                sink.flush()
            except (OSError, ValueError, AttributeError):
                pass  # our stderr is gone; keep draining
            match = _TRITON_LINE.match(raw.decode(errors="replace").rstrip())
            if match and match.group(1) == "E" and len(self.errors) < 100:
                message = match.group(2).strip().strip('"').split("\\n")[0].strip()
                if not any(text in message for text in _HARMLESS):
                    self.errors.append(message)

    def first_error(self) -> str | None:
        """Why models failed to load (Triton's "failed to load 'M' version V: ..."), else its first error."""
        reason = next((e for e in self.errors if "failed to load" in e), None) or next(iter(self.errors), None)
        return reason if reason is None or len(reason) <= 400 else reason[:400] + " ..."

    def close(self, timeout_s: float = 2.0) -> None:
        """Wait for the last lines (the stubs, which share the pipe, are gone by now)."""
        self._thread.join(timeout_s)


def _probe_ready(host: str, http_port: int) -> bool:
    """Triton's strict readiness (every model loaded) over its HTTP port, as a probe would see it."""
    address = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    address = f"[{address}]" if ":" in address else address
    try:
        with urllib.request.urlopen(f"http://{address}:{http_port}/v2/health/ready", timeout=1.0) as response:
            return response.status == 200
    except (OSError, urllib.error.URLError, ValueError):
        return False


class Supervisor:
    """Waits for a started server: relays its log, checks its stubs once it is ready, stops it on request
    (SIGTERM/SIGINT) or when a stub died, and turns how it ended into the worker's status and closing line."""

    def __init__(self, process: subprocess.Popen, host: str, http_port: int, stop_wait_s: float,
                 interval_s: float = WATCH_INTERVAL_S) -> None:
        self.process, self.host, self.http_port = process, host, http_port
        self.stop_wait_s, self.interval_s = stop_wait_s, interval_s
        self.log = TritonLog(process.stderr)
        self.watch = StubWatch(process.pid)
        self.received: list[int] = []
        self.dead: Stub | None = None
        self.failed_loading: Stub | None = None
        self._stopping_since: float | None = None

    def request_stop(self, signum: int, frame: Any = None) -> None:
        """Signal handler: forward SIGTERM to the server (its exit timeout drains in-flight requests)."""
        self.received.append(signum)
        self._stop()

    def _stop(self) -> None:
        if self._stopping_since is None:
            self._stopping_since = time.monotonic()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def run(self) -> int:
        """The server's status once it exited (killed with its group when a stop overran ``stop_wait_s``)."""
        ready = False
        while True:
            try:
                return self.process.wait(timeout=self.interval_s)
            except subprocess.TimeoutExpired:
                pass
            except KeyboardInterrupt:  # a handler-less SIGINT race: stop like the handler does
                self.request_stop(signal.SIGINT)
                continue
            if self._stopping_since is not None:
                if time.monotonic() - self._stopping_since > self.stop_wait_s:
                    LOG.warning("tritonserver did not stop within %g s; killing its process group", self.stop_wait_s)
                    kill_group(self.process.pid)
                continue
            if not ready and _probe_ready(self.host, self.http_port):
                ready = True
                self.watch.arm()
                LOG.info("tritonserver is ready; watching its Python stubs: %s", ", ".join(
                    sorted(f"{s.instance} (pid {s.pid})" for s in (self.watch.watched or {}).values())) or "none")
            self.dead = self.watch.check()
            if not ready and (lost := self.watch.lost_while_loading()) is not None:
                LOG.error("a Python stub (%s, pid %d) crashed while tritonserver loaded the repository (its log "
                          "above says why) and the server would wait for it for ever; stopping it",
                          f"model {lost.model!r}" if lost.model != "unknown" else "model unknown", lost.pid)
                self.failed_loading = lost
                self._stop()
                continue
            if self.dead is not None:
                LOG.error("the Python stub of model %r (instance %s, pid %d) died; Triton would fail every request "
                          "to it from now on, so tritonserver is stopped and the worker exits with status %d to be "
                          "restarted", self.dead.model, self.dead.instance, self.dead.pid, EXIT_STUB_DIED)
                self._stop()

    def outcome(self, code: int, repo: Path) -> int:
        """The worker's exit status, with one closing line saying why when it is not a requested stop."""
        if self.dead is not None:
            return EXIT_STUB_DIED
        if self.failed_loading is not None:  # not a restartable failure: the repository does not load
            LOG.error("tritonserver could not load %s: a Python stub crashed at start%s%s", repo,
                      f" (model {self.failed_loading.model!r})" if self.failed_loading.model != "unknown" else "",
                      f"; {self.log.first_error()}" if self.log.first_error() else "")
            return 1
        if self.received:  # a requested stop is a success, even one that had to kill the server
            LOG.info("tritonserver stopped after signal %d (its status %d)", self.received[0], code)
            return 0
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = "unnamed"
            LOG.error("tritonserver died (signal %d, %s)", -code, name)
            return 128 - code
        if code != 0:
            LOG.error("tritonserver exited with status %d on %s: %s", code, repo,
                      self.log.first_error() or "see its log above (no error line)")
        return code

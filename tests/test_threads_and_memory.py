"""Process-level settings the serving speed depends on: freed memory kept for reuse (model/engine/memory.py)
and the in-process worker's per-thread torch thread counts (service/workers/inprocess.py). The speed itself
is measured by bench/encoder.py and bench/service_lanes.py; these tests check the mechanisms."""

from __future__ import annotations

import asyncio
import os
import platform
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from model.inference import load_predictor
from service.metrics import ServiceMetrics
from service.settings import ServiceSettings
from service.workers import inprocess
from service.workers.base import FAST, LONG
from service.workers.inprocess import InProcessWorker

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def predictor():
    return load_predictor()  # the bundled default model


async def on_lane(worker: InProcessWorker, lane: str, fn):
    """``fn()`` on the lane's (first) model thread."""
    return await asyncio.wrap_future(worker._lanes[lane].threads[0].submit(fn, None))

# Page faults of allocating and touching 48 MiB after a 64 MiB buffer was freed (12,288 pages of 4 KiB when it is
# fresh memory). Smaller than the freed one: an aligned allocation of the very same size may not fit its hole.
FAULTS_PROBE = """
import resource, torch
from model.engine.memory import reuse_freed_memory
print(reuse_freed_memory())
a = torch.ones(16 << 20); del a
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
b = torch.ones(12 << 20)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def probe(env_value: str | None) -> tuple[bool, int]:
    env = {k: v for k, v in os.environ.items() if k != "PONDER_REUSE_FREED_MEMORY"}
    if env_value is not None:
        env["PONDER_REUSE_FREED_MEMORY"] = env_value
    out = subprocess.run([sys.executable, "-c", FAULTS_PROBE], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's (mallopt)")
def test_freed_buffers_are_reused_without_page_faults():
    applied, faults = probe(None)
    assert applied
    assert faults < 1000  # the freed buffer came back from the heap: already mapped
    applied, faults = probe("0")  # opted out: glibc's defaults, a fresh mapping faulted in page by page
    assert not applied
    assert faults > 6000


def test_the_ponder_command_applies_it():
    """Every ``ponder`` command runs with it (the CLI's main applies it before the handler)."""
    code = ("import contextlib, io\nfrom ponder.cli import main\nfrom model.engine import memory\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n    main(['inspect'])\nprint(memory._applied)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == str(platform.libc_ver()[0] == "glibc"), out.stderr[-2000:]


def test_each_model_thread_runs_with_its_own_torch_thread_count(predictor):
    """The fast lane's thread uses ``torch_threads``, long jobs ``long_torch_threads``, whatever order they
    start in and whatever the event loop's thread has: torch's counts are per thread."""
    main_threads = torch.get_num_threads()

    async def counts(settings: ServiceSettings) -> tuple[int, int, int]:
        worker = InProcessWorker(settings, ServiceMetrics(), predictors={"default": predictor})
        await worker.start()
        try:
            long_count = await on_lane(worker, LONG, torch.get_num_threads)
            fast_count = await on_lane(worker, FAST, torch.get_num_threads)
            again = await on_lane(worker, LONG, torch.get_num_threads)
            assert again == long_count
            return fast_count, long_count, torch.get_num_threads()
        finally:
            await worker.stop()

    assert asyncio.run(counts(ServiceSettings(torch_threads=2, long_torch_threads=1))) == (2, 1, main_threads)
    assert asyncio.run(counts(ServiceSettings(torch_threads=1, long_torch_threads=2))) == (1, 2, main_threads)
    fast, long, _ = asyncio.run(counts(ServiceSettings()))  # defaults: torch's count for both
    assert (fast, long) == (main_threads, main_threads)
    fast, long, _ = asyncio.run(counts(ServiceSettings(torch_threads=1)))  # long jobs follow the fast lane
    assert (fast, long) == (1, 1)


def test_each_long_job_runs_on_a_thread_that_ends_with_it(predictor):
    """So the OpenMP team a long job makes is freed with it, and libgomp does not count its threads against the
    cores while the fast lane runs (bench/service_lanes.py)."""
    async def run() -> tuple[threading.Thread, threading.Thread, threading.Thread]:
        worker = InProcessWorker(ServiceSettings(), ServiceMetrics(), predictors={"default": predictor})
        await worker.start()
        try:
            first = await on_lane(worker, LONG, threading.current_thread)
            second = await on_lane(worker, LONG, threading.current_thread)
            fast = await on_lane(worker, FAST, threading.current_thread)
            return first, second, fast
        finally:
            await worker.stop()

    first, second, fast = asyncio.run(run())
    assert first is not second and not first.is_alive() and not second.is_alive()
    assert first.name == "ponder-long-0-call"
    assert fast.name == "ponder-fast-0" and fast.is_alive() is False  # stopped with the worker


def test_models_load_on_the_fast_lanes_thread(monkeypatch):
    """Loading runs torch ops; on any other thread it would make a second multi-threaded OpenMP team."""
    real_load, threads = inprocess.load_predictors, []

    def observed(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(inprocess, "load_predictors", observed)

    async def start_and_stop() -> list[str]:
        worker = InProcessWorker(ServiceSettings(), ServiceMetrics())  # the bundled default model
        await worker.start()
        try:
            assert worker.models()  # the bundled default's segment, detect and render models
            return [t.name for t in worker._lanes[FAST].threads]
        finally:
            await worker.stop()

    fast_threads = asyncio.run(start_and_stop())
    assert threads == fast_threads


def test_a_failed_load_ends_the_lane_threads(tmp_path):
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a checkpoint")
    before = {t.name for t in threading.enumerate()}
    worker = InProcessWorker(ServiceSettings(checkpoint=str(broken)), ServiceMetrics())
    with pytest.raises(Exception, match="broken.pth"):
        asyncio.run(worker.start())
    for thread in threading.enumerate():
        if thread.name.startswith("ponder-") and thread.name not in before:
            thread.join(5)
    assert not {t.name for t in threading.enumerate() if t.name.startswith("ponder-")} - before

"""``ponder extract`` robustness (audit findings 2, 3, 10, 11, 12, 13): resume only what was made from the same
input with the same options (a manifest in the output folder), refuse two inputs for one output, never read
the output folder as input, check the URL / gateway / model before any file, do not retry permanent errors
(4xx, 501, 504), one clean message per failure, no httpx log lines, left-out files listed.

Most tests run against :class:`FakeGateway`, an in-process HTTP server that answers like the gateway and
counts the requests; the tests about the features themselves use one real gateway (module scope)."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest_service import PYTHON, REPO, SPUNET, Server, require_fixtures, scene, write_format  # noqa: E402

from service.extract import ExtractOptions, extract  # noqa: E402
from service.extract_inputs import expand_inputs  # noqa: E402
from service.extract_manifest import MANIFEST  # noqa: E402


def ponder_extract(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """``ponder extract`` through the real entry point (its logging set-up and error handling)."""
    return subprocess.run([PYTHON, "-m", "ponder.cli", "extract", *args, "--no-progress"], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def unused_port(low: int = 18500, high: int = 18999) -> int:
    for port in range(low, high + 1):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.skip(f"no free loopback port in {low}-{high}")


def cloud_file(path: Path, n: int = 50, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    np.save(path, rng.random((n, 3), dtype=np.float32)) if path.suffix == ".npy" else \
        np.savez(path, coord=rng.random((n, 3), dtype=np.float32))
    return path


class FakeGateway:
    """Answers GET /v1/models (model "m") and POST /v1/features: ``answers`` maps an upload's file name to
    (status, problem detail); any other upload gets a (4, 8) float32 NPY. ``posts`` lists the uploads' names."""

    def __init__(self, answers: dict[str, tuple[int, str]] | None = None, models_status: int = 200,
                 conditions: list[str] | None = None, post_delay_s: float = 0.0) -> None:
        self.answers, self.models_status, self.posts = answers or {}, models_status, []
        self.conditions, self.post_delay_s = conditions or [], post_delay_s
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def reply(self, status: int, body: bytes, kind: str, extra: dict | None = None) -> None:
                self.send_response(status)
                self.send_header("content-type", kind)
                for key, value in (extra or {}).items():
                    self.send_header(key, value)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                if urlparse(self.path).path == "/v1/models" and fake.models_status == 200:
                    model = {"name": "m", "version": "1", "conditions": fake.conditions,
                             "default_condition": fake.conditions[0] if fake.conditions else None}
                    listing = {"models": [model], "default_model": "m", "worker": "fake"}
                    self.reply(200, json.dumps(listing).encode(), "application/json")
                else:
                    self.reply(fake.models_status if fake.models_status != 200 else 404,
                               b'{"error":"Not Found"}', "application/json")

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length", 0)))
                name = parse_qs(urlparse(self.path).query)["filename"][0]
                fake.posts.append(name)
                time.sleep(fake.post_delay_s)
                if name in fake.answers:
                    status, detail = fake.answers[name]
                    problem = {"type": "urn:ponder:problem:x", "title": "x", "status": status, "detail": detail,
                               "request_id": "req-1"}
                    self.reply(status, json.dumps(problem).encode(), "application/problem+json",
                               {"retry-after": "0"})
                    return
                buffer = io.BytesIO()
                np.save(buffer, np.ones((4, 8), np.float32))
                self.reply(200, buffer.getvalue(), "application/x-npy")

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", unused_port()), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> "FakeGateway":
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def gateway_url():
    """One real gateway (the SPUNet fixture) on a loopback port in 18500-18999 for the whole module."""
    require_fixtures()
    with tempfile.TemporaryDirectory() as tmp:
        port = unused_port()
        env = {**os.environ, "PONDER_CHECKPOINT": str(SPUNET), "PONDER_TORCH_THREADS": "2"}
        server = Server([PYTHON, "-m", "uvicorn", "service.app:create_app", "--factory", "--host", "127.0.0.1",
                         "--port", str(port)], env, "/readyz", port, Path(tmp) / "gateway.log")
        try:
            yield server.wait_ready(180).url
        finally:
            server.stop()


# --- 4. pre-flight: URL, reachability, model -----------------------------------------------------------


def test_server_without_scheme_is_refused_at_once(tmp_path):
    cloud_file(tmp_path / "in" / "a.npy")
    run = ponder_extract(str(tmp_path / "in"), "--server", "127.0.0.1:18999", "-o", str(tmp_path / "out"))
    assert run.returncode == 2, run.stderr
    assert "has no scheme" in run.stderr and "http://127.0.0.1:18999" in run.stderr, run.stderr
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert not (tmp_path / "out").exists()


def test_unreachable_gateway_is_refused_before_any_file(tmp_path):
    for i in range(3):
        cloud_file(tmp_path / "in" / f"s{i}.npy", seed=i)
    url = f"http://127.0.0.1:{unused_port()}"  # nothing listens there
    run = ponder_extract(str(tmp_path / "in"), "--server", url, "-o", str(tmp_path / "out"))
    assert run.returncode == 2, run.stdout + run.stderr
    assert "cannot reach the gateway" in run.stderr and url in run.stderr, run.stderr
    assert "s0.npy" not in run.stdout + run.stderr  # no per-file failures
    assert not (tmp_path / "out").exists()


def test_wrong_port_and_unknown_model_are_refused(tmp_path):
    cloud_file(tmp_path / "in" / "a.npy")
    with FakeGateway(models_status=404) as triton_port:  # e.g. Triton's HTTP port given by mistake
        run = ponder_extract(str(tmp_path / "in"), "--server", triton_port.url, "-o", str(tmp_path / "o1"))
        assert run.returncode == 2 and "does not look like a ponder gateway" in run.stderr, run.stderr
        assert triton_port.posts == []
    with FakeGateway() as fake:
        run = ponder_extract(str(tmp_path / "in"), "--server", fake.url, "-o", str(tmp_path / "o2"), "--model", "nope")
        assert run.returncode == 2, run.stdout + run.stderr
        assert "no model 'nope'" in run.stderr and "serves: m" in run.stderr, run.stderr
        assert fake.posts == []


def test_condition_is_checked_before_any_file(tmp_path):
    cloud_file(tmp_path / "in" / "a.npy")
    with FakeGateway(conditions=["ScanNet", "S3DIS"]) as fake:
        run = ponder_extract(str(tmp_path / "in"), "--server", fake.url, "-o", str(tmp_path / "o"),
                             "--condition", "Mars")
        assert run.returncode == 2, run.stdout + run.stderr
        assert "unknown condition 'Mars'" in run.stderr and "ScanNet, S3DIS" in run.stderr, run.stderr
        assert fake.posts == [] and not (tmp_path / "o").exists()
        run = ponder_extract(str(tmp_path / "in"), "--server", fake.url, "-o", str(tmp_path / "o"),
                             "--condition", "S3DIS")
        assert run.returncode == 0 and fake.posts == ["a.npy"], run.stdout + run.stderr
    with FakeGateway() as unconditioned:
        run = ponder_extract(str(tmp_path / "in"), "--server", unconditioned.url, "-o", str(tmp_path / "o2"),
                             "--condition", "ScanNet")
        assert run.returncode == 2 and "takes no condition" in run.stderr, run.stderr
        assert unconditioned.posts == []


def test_ctrl_c_keeps_finished_outputs_prints_the_summary_and_a_rerun_finishes(tmp_path):
    folder, out = tmp_path / "in", tmp_path / "out"
    for i in range(6):
        cloud_file(folder / f"c{i}.npy", seed=i)
    with FakeGateway(post_delay_s=0.5) as fake:
        command = [PYTHON, "-m", "ponder.cli", "extract", str(folder), "--server", fake.url, "-o", str(out),
                   "--no-progress", "--concurrency", "1"]
        proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while len(list(out.glob("c*.npy"))) < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=30)
        assert proc.returncode == 130, stdout + stderr
        assert "Traceback" not in stderr, stderr
        done = sorted(p.name for p in out.glob("c*.npy"))
        assert 2 <= len(done) < 6, done
        assert "interrupted:" in stdout and "run the same command again" in stdout, stdout
        assert not list(out.rglob("*.ponder-tmp")), "a temporary file was left behind"
        for name in done:  # every output in place is whole
            assert np.load(out / name, allow_pickle=False).shape == (4, 8)
        posts = len(fake.posts)
        rerun = ponder_extract(str(folder), "--server", fake.url, "-o", str(out))
        assert rerun.returncode == 0, rerun.stdout + rerun.stderr
        assert f"skipped {len(done)}" in rerun.stdout, rerun.stdout
        assert len(fake.posts) == posts + 6 - len(done)
    assert sorted(p.name for p in out.glob("c*.npy")) == [f"c{i}.npy" for i in range(6)]


# --- 5. retries and messages ---------------------------------------------------------------------------


def test_permanent_errors_are_not_retried_and_messages_are_clean(tmp_path):
    names = {"gone.npy": (404, "unknown thing"), "slow.npy": (504, "the request did not finish within 0.3 s"),
             "nope.npy": (501, "precise segmentation is not available"), "busy.npy": (503, "worker restarting")}
    for i, name in enumerate(names):
        cloud_file(tmp_path / "in" / name, seed=i)
    with FakeGateway(names) as fake:
        run = ponder_extract(str(tmp_path / "in"), "--server", fake.url, "-o", str(tmp_path / "out"),
                             "--retries", "2", "--concurrency", "1")
    log = run.stdout + run.stderr
    assert run.returncode == 1, log
    assert {name: fake.posts.count(name) for name in names} == {
        "gone.npy": 1, "slow.npy": 1, "nope.npy": 1, "busy.npy": 3}, fake.posts  # only 503 is retried
    assert "HTTP 503: worker restarting (after 3 attempts) (request id req-1)" in log, log
    assert "HTTP 504: the request did not finish within 0.3 s" in log, log
    assert "HTTP 503: HTTP 503" not in log and "urn:ponder" not in log and '{"' not in log, log


# --- 6. output: no httpx lines, each failure once, left-out files listed -------------------------------


def test_quiet_output_each_failure_once_and_left_out_files_listed(tmp_path):
    folder = tmp_path / "in"
    for i in range(3):
        cloud_file(folder / f"ok{i}.npy", seed=i)
    cloud_file(folder / "bad.npy", seed=9)
    (folder / "notes.doc").write_text("not a cloud")
    (folder / "scan.ply.gz").write_bytes(b"\x1f\x8b compressed")
    with FakeGateway({"bad.npy": (422, "NPY array must have shape (N, 3)")}) as fake:
        run = ponder_extract(str(folder), "--server", fake.url, "-o", str(tmp_path / "out"))
    log = run.stdout + run.stderr
    assert run.returncode == 1, log
    assert "HTTP Request" not in log, log  # httpx's INFO line per upload
    assert log.count("bad.npy") == 1, log
    assert "extracted 3" in run.stdout and "failed 1" in run.stdout, log
    left_out = next(line for line in run.stdout.splitlines() if line.startswith("left out"))
    assert "left out 2 file(s)" in left_out and "notes.doc" in left_out, left_out
    assert "scan.ply.gz (compressed: decompress it first)" in left_out, left_out
    assert "notes.doc" not in fake.posts and "scan.ply.gz" not in fake.posts


def test_glob_leaves_out_unsupported_files(tmp_path):
    cloud_file(tmp_path / "a.npy")
    (tmp_path / "notes.doc").write_text("x")
    inputs = expand_inputs([str(tmp_path / "*")])
    assert [p.name for p in inputs] == ["a.npy"]
    assert [p.name for p in inputs.unsupported] == ["notes.doc"]


# --- 3. output folder inside the input folder ----------------------------------------------------------


def test_output_folder_inside_input_folder_is_not_read_as_input(tmp_path):
    folder = tmp_path / "in"
    for i in range(2):
        cloud_file(folder / f"s{i}.npy", seed=i)
    out = folder / "features"
    with FakeGateway() as fake:
        for _ in range(2):
            run = ponder_extract(str(folder), "--server", fake.url, "-o", str(out), "--format", "npy")
            assert run.returncode == 0, run.stdout + run.stderr
        second = run.stdout
        # outputs shaped like clouds (N, 3) would pass any shape filter; they must still not be inputs
        np.save(out / "s0.npy", np.ones((4, 3), np.float32))
        run = ponder_extract(str(folder), "--server", fake.url, "-o", str(out))
    assert sorted(fake.posts) == ["s0.npy", "s0.npy", "s1.npy"], fake.posts  # s0 redone: its output changed
    assert "skipped 2" in second and "ignored" not in second, second
    assert "features" not in run.stdout + run.stderr


# --- 2. collisions and the manifest ---------------------------------------------------------------------


def test_two_inputs_for_one_output_are_refused_naming_both(tmp_path):
    cloud_file(tmp_path / "in" / "a.npy")
    cloud_file(tmp_path / "in" / "a.npz")
    with FakeGateway() as fake:
        run = ponder_extract(str(tmp_path / "in"), "--server", fake.url, "-o", str(tmp_path / "out"))
        assert fake.posts == []
    assert run.returncode == 2, run.stdout + run.stderr
    assert "a.npy" in run.stderr and "a.npz" in run.stderr and "both" in run.stderr, run.stderr
    assert not (tmp_path / "out").exists()


def test_manifest_rules_with_fake_gateway(tmp_path):
    """Changed input -> redone; output from before the manifest -> redone (and said); other options -> exit 2;
    --overwrite (ExtractOptions.overwrite) -> redone with the new options."""
    folder, out = tmp_path / "in", tmp_path / "out"
    a, b = cloud_file(folder / "a.npy"), cloud_file(folder / "b.npy", seed=1)
    with FakeGateway() as fake:
        assert ponder_extract(str(folder), "--server", fake.url, "-o", str(out)).returncode == 0
        assert (out / MANIFEST).is_file()
        cloud_file(a, n=60, seed=5)  # a.npy changed since its output was made
        cloud_file(folder / "c.npy", seed=2)
        (out / "c.npy").write_bytes((out / "a.npy").read_bytes())  # an output no manifest line speaks for
        run = ponder_extract(str(folder), "--server", fake.url, "-o", str(out))
        assert run.returncode == 0, run.stdout + run.stderr
        assert "extracted 2, skipped 1" in run.stdout and "redid 1" in run.stdout, run.stdout
        assert sorted(fake.posts) == ["a.npy", "a.npy", "b.npy", "c.npy"]
        run = ponder_extract(str(folder), "--server", fake.url, "-o", str(out), "--dtype", "float16")
        assert run.returncode == 2, run.stdout + run.stderr
        assert "other options" in run.stderr and "dtype 'float32' -> 'float16'" in run.stderr, run.stderr
        assert len(fake.posts) == 4
        opts = ExtractOptions(server=fake.url, out_dir=out, dtype="float16", overwrite=True, progress=False)
        report = asyncio.run(extract(expand_inputs([str(folder)]), opts))
        assert len(report.done) == 3 and len(fake.posts) == 7
        run = ponder_extract(str(folder), "--server", fake.url, "-o", str(out), "--dtype", "float16")
        assert run.returncode == 0 and "skipped 3" in run.stdout, run.stdout + run.stderr
    assert len(fake.posts) == 7 and b.exists()


def test_rerun_with_other_input_or_dtype_does_not_keep_wrong_features(gateway_url, tmp_path):
    """The audit's case: a.npz's features must not be 'skipped' for a.ply, and float32 outputs not for float16."""
    folder, out = tmp_path / "coll", tmp_path / "out"
    folder.mkdir()
    write_format(scene(700, seed=1), folder / "a.npz")
    write_format(scene(400, seed=2), folder / "a.ply")
    run = ponder_extract(str(folder / "a.npz"), "--server", gateway_url, "-o", str(out))
    assert run.returncode == 0 and "extracted 1" in run.stdout, run.stdout + run.stderr
    assert np.load(out / "a.npy").shape[0] == 700
    run = ponder_extract(str(folder / "a.ply"), "--server", gateway_url, "-o", str(out))
    assert run.returncode == 2, run.stdout + run.stderr
    assert "a.npz" in run.stderr and "a.ply" in run.stderr, run.stderr
    run = ponder_extract(str(folder / "a.npz"), "--server", gateway_url, "-o", str(out), "--dtype", "float16")
    assert run.returncode == 2 and "dtype" in run.stderr, run.stdout + run.stderr
    assert np.load(out / "a.npy").dtype == np.float32
    run = ponder_extract(str(folder / "a.npz"), "--server", gateway_url, "-o", str(out), "--dtype", "float16",
                         "--overwrite")
    assert run.returncode == 0, run.stdout + run.stderr
    features = np.load(out / "a.npy")
    assert features.dtype == np.float16 and features.shape == (700, 24)
    run = ponder_extract(str(folder / "a.npz"), "--server", gateway_url, "-o", str(out), "--model", "nope")
    assert run.returncode == 2 and "no model 'nope'" in run.stderr, run.stdout + run.stderr

"""Hostile clients against a real gateway (uvicorn on loopback, the bundled default model, a fast lane of two
places): uploads that stall or trickle hold no lane place and end with 408 (idle, or under the rate floor); a client that leaves mid-upload is
a 499 in the logs, not a 500; an answer format that cannot carry the answer is refused before the upload is
read; multipart limits are 413s; the precise mode takes scenes as wide as the fast mode does."""

from __future__ import annotations

import io
import socket
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest_service import gateway, npz_bytes, require_fixtures, scene  # noqa: E402

IDLE_S = 2.0


@pytest.fixture(scope="module")
def server():
    require_fixtures()
    env = {"PONDER_QUEUE_SIZE": "1", "PONDER_TORCH_THREADS": "1", "PONDER_UPLOAD_IDLE_TIMEOUT_S": str(IDLE_S)}
    with gateway(env) as srv:
        yield srv


def stalled_upload(server, request_id: str, declared: int = 100_000) -> socket.socket:
    """A raw connection that sends the headers of a features upload and 10 bytes of its body, then nothing."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.sendall((f"POST /v1/features?format=npz HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {declared}\r\n"
                  f"Content-Type: application/octet-stream\r\nX-Request-ID: {request_id}\r\n\r\n").encode()
                 + b"PK\x03\x04" + b"\x00" * 6)
    return sock


def read_until_closed(sock: socket.socket) -> str:
    """Everything the server sends until it closes the connection (the answer is sent in several packets)."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


def features(server, n: int = 1500, request_id: str = "features", **headers) -> httpx.Response:
    return httpx.post(server.url + "/v1/features", content=npz_bytes(scene(n)), params={"format": "npz"},
                      headers={"Accept": "application/x-npy", "X-Request-ID": request_id, **headers}, timeout=120)


def access_status(server, request_id: str, wait_s: float = 20.0) -> int | None:
    """The status of ``request_id``'s access-log line (None if it has none within ``wait_s``)."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        for line in server.log_lines():
            if line.get("request_id") == request_id and "status" in line:
                return int(line["status"])
        time.sleep(0.2)
    return None


def test_stalled_uploads_hold_no_lane_place_and_end_with_408(server):
    stalled = [stalled_upload(server, f"stalled-{i}") for i in range(6)]  # three times the fast lane's places
    try:
        time.sleep(0.5)
        assert httpx.get(server.url + "/readyz", timeout=10).status_code == 200
        answer = features(server, request_id="beside-stalled")
        assert answer.status_code == 200, answer.text
        replies = []
        for sock in stalled:  # each is answered once its body has been idle for PONDER_UPLOAD_IDLE_TIMEOUT_S
            replies.append(read_until_closed(sock))
    finally:
        for sock in stalled:
            sock.close()
    for reply in replies:
        assert reply.startswith("HTTP/1.1 408"), reply[:200]
        assert "PONDER_UPLOAD_IDLE_TIMEOUT_S" in reply
    assert access_status(server, "stalled-0") == 408


def test_trickling_upload_ends_with_408_once_its_rate_is_under_the_floor(server):
    """A byte every 0.4 s never trips the idle limit (2 s); past that first window its average rate (~2.5 B/s)
    is under PONDER_UPLOAD_MIN_BYTES_PER_S (default 1024) and the next bytes end it, long before the deadline."""
    sock = stalled_upload(server, "trickling")
    started = time.monotonic()
    sock.settimeout(0.4)
    reply = b""
    try:
        while time.monotonic() - started < 30:
            try:
                sock.sendall(b"\x00")
            except OSError:  # the server answered and closed
                break
            try:
                if chunk := sock.recv(65536):
                    reply += chunk
                    break
            except TimeoutError:
                continue
        sock.settimeout(10)
        reply = (reply + read_until_closed(sock).encode()).decode(errors="replace")
    finally:
        sock.close()
    took = time.monotonic() - started
    assert reply.startswith("HTTP/1.1 408"), reply[:300]
    assert "PONDER_UPLOAD_MIN_BYTES_PER_S" in reply and "bytes/s" in reply
    assert IDLE_S <= took < 2 * IDLE_S + 2, took  # after the first idle window, within two
    assert access_status(server, "trickling") == 408


def test_client_leaving_mid_upload_is_499_not_500(server):
    sock = stalled_upload(server, "left-mid-upload")
    time.sleep(0.3)
    sock.close()
    assert access_status(server, "left-mid-upload") == 499
    assert not [line for line in server.log_lines() if line.get("request_id") == "left-mid-upload"
                and line.get("level") == "ERROR"]
    assert features(server).status_code == 200


def decoded(server, request_id: str) -> bool:
    return any(line.get("request_id") == request_id and line.get("msg", "").startswith("decoded")
               for line in server.log_lines())


@pytest.mark.parametrize("route, params, accept", [
    ("features", {"output": "per_voxel"}, "application/x-npy"),
    ("features", {"output": "per_voxel"}, "application/vnd.apache.arrow.stream"),
    ("segment", {"logits": "true"}, "application/x-npy"),
])
def test_impossible_answer_format_is_refused_before_the_upload_is_read(server, route, params, accept):
    request_id = f"unfit-{route}-{accept.rsplit('.', 1)[-1].rsplit('-', 1)[-1]}"
    answer = httpx.post(server.url + f"/v1/{route}", content=npz_bytes(scene(3000)),
                        params={"format": "npz", **params},
                        headers={"Accept": accept, "X-Request-ID": request_id}, timeout=120)
    if accept.endswith("arrow.stream") and answer.status_code == 406 and "available formats" in answer.text:
        pytest.skip("pyarrow is not installed: Arrow answers are not offered")
    assert answer.status_code == 406, answer.text
    assert "npz" in answer.json()["detail"]
    assert not decoded(server, request_id)


def test_multipart_over_its_limits_is_413(server):
    many = [(f"extra_{i}", (f"f{i}.bin", b"x", "application/octet-stream")) for i in range(200)]
    answer = httpx.post(server.url + "/v1/detect", files=[("file", ("room.npz", npz_bytes(scene(500)))), *many],
                        timeout=60)
    assert answer.status_code == 413 and "Too many files" in answer.json()["detail"], answer.text
    big_field = {"cameras": "x" * (5 << 20)}
    answer = httpx.post(server.url + "/v1/detect", files={"file": ("room.npz", npz_bytes(scene(500)))},
                        data=big_field, timeout=60)
    assert answer.status_code == 413 and "file part" in answer.json()["detail"], answer.text


def test_precise_mode_takes_a_scene_as_wide_as_the_fast_mode(server):
    """300 points over a 20 km cube: one scene's voxel keys fit, 13 augmented copies in one batch do not."""
    buffer = io.BytesIO()
    np.save(buffer, (np.random.default_rng(0).random((300, 3)) * 20_000).astype(np.float32))
    for mode in ("fast", "precise"):
        answer = httpx.post(server.url + "/v1/segment", content=buffer.getvalue(),
                            params={"format": "npy", "mode": mode}, headers={"Accept": "application/json"},
                            timeout=300)
        assert answer.status_code == 200, (mode, answer.text)
        assert len(answer.json()["labels"]) == 300

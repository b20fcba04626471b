"""No single request can wedge or starve the gateway (real uvicorn processes on loopback, the bundled default
models): a render or precise segmentation past its deadline stops its model thread; features keep flowing
beside a long job (lanes); a full lane refuses with 503 before the upload is decoded; /readyz reports a stuck
or full lane; SIGTERM drains for a bounded time and exits; a huge cameras document never blocks /healthz.

No wall-clock asserts: each check is an ordering (X answered while Y was still running) or a request that
could only succeed if the model thread had been freed."""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest_service import gateway, look_at, npz_bytes, require_fixtures, scene  # noqa: E402

def camera(width: int, height: int) -> dict:
    """A camera looking at the fixture room from one corner."""
    f = 0.8 * width
    pose = look_at(np.array([3.0, 3.0, 2.5]), np.array([0.0, 0.0, 0.5]))
    return {"width": width, "height": height, "fx": f, "fy": f, "cx": width / 2 - 0.5, "cy": height / 2 - 0.5,
            "camera_to_world": pose.tolist()}


def render(url: str, size: int, timeout_s: float, request_id: str = "render", cameras=None) -> httpx.Response:
    files = {"file": ("room.npz", npz_bytes(scene(4000)), "application/octet-stream"),
             "cameras": ("cameras.json", cameras or json.dumps(camera(size, size)), "application/json")}
    return httpx.post(url + "/v1/render", params={"timeout_s": timeout_s}, files=files, timeout=300,
                      headers={"X-Request-ID": request_id})


def features(url: str, n: int = 2000, request_id: str = "features") -> httpx.Response:
    return httpx.post(url + "/v1/features", content=npz_bytes(scene(n)), params={"format": "npz"},
                      headers={"Accept": "application/x-npy", "X-Request-ID": request_id}, timeout=120)


class Background:
    """Run ``fn`` in a thread; ``done`` says whether it has answered yet."""

    def __init__(self, fn, *args, **kwargs) -> None:
        self.result: httpx.Response | BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn, args, kwargs), daemon=True)
        self._thread.start()

    def _run(self, fn, args, kwargs) -> None:
        try:
            self.result = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.result = exc

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self, timeout: float = 300) -> httpx.Response:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the request never answered"
        assert isinstance(self.result, httpx.Response), self.result
        return self.result


def decoded_ids(server) -> set[str]:
    return {line.get("request_id") for line in server.log_lines() if line.get("msg", "").startswith("decoded")}


@pytest.fixture(scope="module")
def server():
    require_fixtures()
    env = {"PONDER_LONG_QUEUE_SIZE": "0", "PONDER_LONG_CONCURRENCY": "1", "PONDER_TORCH_THREADS": "1"}
    with gateway(env) as srv:
        yield srv


def test_render_past_its_deadline_stops_and_features_answer_meanwhile(server):
    slow = Background(render, server.url, 512, 3.0, "slow-render")  # ~0.26 MP: minutes on this CPU
    time.sleep(1.0)
    quick = features(server.url, 2000)
    assert quick.status_code == 200, quick.text
    assert not slow.done, "features should have answered while the render was still running (its own lane)"
    late = slow.wait()
    assert late.status_code == 504, late.text
    assert "did not finish within 3 s" in late.json()["detail"]
    # The long lane has one thread and no waiting room: this render can only run (and answer 200 within
    # its own deadline) if the timed-out one stopped at its next ray chunk.
    again = render(server.url, 8, 60.0, "small-render")
    assert again.status_code == 200, again.text
    assert again.headers["content-type"] == "image/png"
    assert httpx.get(server.url + "/readyz", timeout=10).status_code == 200


def test_precise_segmentation_past_its_deadline_stops(server):
    body = npz_bytes(scene())  # the whole 30,717-point room: 13 augmentations x fragments
    late = httpx.post(server.url + "/v1/segment", content=body,
                      params={"format": "npz", "mode": "precise", "timeout_s": 1.0},
                      headers={"Accept": "application/json", "X-Request-ID": "slow-precise"}, timeout=300)
    assert late.status_code == 504, late.text
    small = httpx.post(server.url + "/v1/segment", content=npz_bytes(scene(500)),
                       params={"format": "npz", "mode": "precise", "timeout_s": 60},
                       headers={"Accept": "application/json"}, timeout=300)
    assert small.status_code == 200, small.text
    assert small.json()["mode"] == "precise"


def test_client_that_leaves_cancels_its_job(server):
    files = {"file": ("room.npz", npz_bytes(scene(4000)), "application/octet-stream"),
             "cameras": ("cameras.json", json.dumps(camera(512, 512)), "application/json")}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes its connection
        httpx.post(server.url + "/v1/render", params={"timeout_s": 600}, files=files, timeout=4,
                   headers={"X-Request-ID": "leaving-render"})
    # One long-lane thread, no waiting room: this only answers if the abandoned render was cancelled.
    again = render(server.url, 8, 60.0, "after-leaving")
    assert again.status_code == 200, again.text


def test_full_lane_refuses_before_decoding_and_readyz_says_so(server):
    slow = Background(render, server.url, 512, 20.0, "occupying-render")
    time.sleep(1.5)
    ready = httpx.get(server.url + "/readyz", timeout=10)
    assert ready.status_code == 503, ready.text
    assert "long lane's queue is full" in ready.json()["detail"]
    refused = httpx.post(server.url + "/v1/detect", content=npz_bytes(scene(3000)), params={"format": "npz"},
                         headers={"X-Request-ID": "refused-detect"}, timeout=60)
    assert refused.status_code == 503, refused.text
    assert refused.headers.get("retry-after")
    assert "long lane's queue is full" in refused.json()["detail"]
    assert features(server.url, 1000).status_code == 200  # the fast lane is not affected
    assert slow.wait().status_code == 504
    ids = decoded_ids(server)
    assert "occupying-render" in ids  # the admitted request was decoded (and logged so) ...
    assert "refused-detect" not in ids  # ... the refused one never was
    assert httpx.get(server.url + "/readyz", timeout=10).status_code == 200


def test_huge_cameras_document_is_refused_without_blocking_healthz(server):
    frame = {"transform_matrix": np.eye(4, dtype=int).tolist()}
    doc = {"fl_x": 500.0, "fl_y": 500.0, "cx": 320.0, "cy": 240.0, "w": 640, "h": 480,
           "frames": [frame] * 60_000}
    text = json.dumps(doc, separators=(",", ":"))  # ~3.8 MB, as a real 60,000-frame transforms.json
    assert len(text) < 4 << 20
    slow = Background(render, server.url, 0, 60.0, "huge-cameras", cameras=text)
    answers = []
    while not slow.done:
        answers.append(httpx.get(server.url + "/healthz", timeout=30).status_code)
    refused = slow.wait()
    assert refused.status_code == 413, refused.text
    assert "60000 cameras exceed" in refused.json()["detail"]
    assert answers and set(answers) == {200}


@pytest.mark.slow  # its own gateway, and a one-chunk render that runs on past its deadline
def test_readyz_reports_a_model_thread_stuck_past_its_deadline():
    require_fixtures()
    # One chunk holds every ray of the view, so the render cannot stop before the whole view is done.
    env = {"PONDER_RENDER_CHUNK": "1000000", "PONDER_TORCH_THREADS": "1"}
    with gateway(env) as srv:
        assert render(srv.url, 128, 3.0, "stuck-render").status_code == 504  # answered at its deadline ...
        seen = []
        for _ in range(300):  # ... while its model thread is still inside the one chunk
            ready = httpx.get(srv.url + "/readyz", timeout=30)
            seen.append((ready.status_code, ready.json()["detail"]))
            if ready.status_code == 200 and any(status == 503 for status, _ in seen):
                break  # stuck, then free again once the pass ended
            time.sleep(0.2)
        stuck = [detail for status, detail in seen if status == 503 and "past its request's deadline" in detail]
        if not stuck:
            pytest.skip(f"the one-chunk render ended within the stuck grace here ({len(seen)} polls, last {seen[-1]})")
        assert seen[-1][0] == 200, f"/readyz never recovered after the stuck pass ended: {seen[-3:]}"


def test_sigterm_drains_then_cancels_and_exits():
    require_fixtures()
    with gateway({"PONDER_DRAIN_S": "2", "PONDER_TORCH_THREADS": "1"}) as srv:
        slow = Background(render, srv.url, 512, 600.0, "draining-render")
        time.sleep(2.0)
        srv.process.send_signal(signal.SIGTERM)
        srv.process.wait(timeout=60)  # minutes of rendering left: only the drain bound can end it this soon
        answer = slow.wait(60)
        assert answer.status_code == 503, answer.text
        assert "shutting down" in answer.json()["detail"]


def test_cancel_token_reaches_precise_segmentation_in_process():
    """model.cancel without the service: an explicit token, and the one made active for the context."""
    require_fixtures()
    from model.cancel import CancelToken, Cancelled, active
    from model.inference import load_predictor
    from model.tta import precise_probabilities

    predictor = load_predictor()
    token = CancelToken()
    token.cancel("stopped by the test")
    with pytest.raises(Cancelled, match="stopped by the test"):
        precise_probabilities(predictor, scene(500), None, cancel=token)
    with active(CancelToken.after(-1.0)), pytest.raises(Cancelled, match="deadline passed"):
        predictor.segment(scene(500), precise=True)
    assert predictor.segment(scene(500), precise=True).labels.shape == (500,)  # no token: runs to the end

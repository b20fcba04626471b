"""The viewer page (/) and the offline API docs (/docs, /redoc) in a real browser (the system's chromium driven
by playwright) against a real uvicorn gateway on the bundled default model. Every request that does not go to
the loopback server is blocked, so the pages must work without internet. The HTTP-level checks at the end need
no browser."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest_service import REPO, gateway  # noqa: E402

SAMPLE = REPO / "service" / "static" / "samples" / "room.npz"
CHROMIUM = os.environ.get("PONDER_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
STAGE = (1100, 760)  # viewport; the stage is what is right of the 300 px panel
WAIT_MS = 120_000


@pytest.fixture(scope="module")
def server():
    with gateway({}) as running:
        yield running


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install playwright; it is in the dev extra)")
    if not CHROMIUM:
        pytest.skip("no chromium executable found (apt-get install -y chromium, or set PONDER_CHROMIUM)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield launched
        launched.close()


@dataclass
class Record:
    console_errors: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    def clear(self) -> None:
        self.console_errors.clear()
        self.blocked.clear()
        self.failed.clear()

    def assert_clean(self) -> None:
        assert not self.blocked, f"the page tried to reach the network: {self.blocked}"
        assert not self.failed, f"failed requests: {self.failed}"
        assert not self.console_errors, f"console errors: {self.console_errors}"


@contextmanager
def offline_page(browser) -> Iterator[tuple[object, Record]]:
    """A page whose requests to anything but the loopback server are aborted (and recorded)."""
    context = browser.new_context(viewport={"width": STAGE[0], "height": STAGE[1]})
    record = Record()

    def route(request_route) -> None:
        url = request_route.request.url
        if urlsplit(url).hostname in ("127.0.0.1", "localhost") or url.startswith(("data:", "blob:")):
            request_route.continue_()
        else:
            record.blocked.append(url)
            request_route.abort()

    context.route("**/*", route)
    page = context.new_page()
    page.on("console", lambda m: record.console_errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: record.console_errors.append(f"uncaught: {e}"))
    page.on("requestfailed", lambda r: record.failed.append(f"{r.url}: {r.failure}"))
    try:
        yield page, record
    finally:
        context.close()


def stage_pixels(page) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(page.locator("#stage canvas").screenshot())).convert("RGB"))


def swatch_colors(page, selector: str) -> list[tuple[int, int, int]]:
    styles = page.eval_on_selector_all(f"{selector} .swatch",
                                       "els => els.map(e => getComputedStyle(e).backgroundColor)")
    return [tuple(int(v) for v in re.findall(r"\d+", s)[:3]) for s in styles]


def pixels_near(pixels: np.ndarray, rgb: tuple[int, int, int], tolerance: int = 3) -> int:
    return int((np.abs(pixels.astype(int) - np.array(rgb)).max(axis=-1) <= tolerance).sum())


def wait_idle(page) -> str:
    page.wait_for_function("document.getElementById('status').dataset.state !== 'busy'", timeout=WAIT_MS)
    return page.inner_text("#status")


@pytest.fixture(scope="module")
def loaded(browser, server):  # browser first: without one, skip before starting a server
    """The viewer with the bundled sample loaded, segmented and detected (shared by the viewer tests)."""
    with offline_page(browser) as (page, record):
        page.goto(server.url + "/")
        page.wait_for_selector("#segment-model option[value=default]", state="attached")
        page.click("#sample")
        page.wait_for_function("Number(document.getElementById('box-count').dataset.count) > 0 || "
                               "document.getElementById('status').dataset.state === 'error'", timeout=WAIT_MS)
        wait_idle(page)
        yield page, record


def test_sample_segmentation_draws_label_colours(loaded):
    page, record = loaded
    assert page.get_attribute("#cloud-info", "data-points") == "101390", page.inner_text("#cloud-info")
    assert page.is_checked("input[name=mode][value=segment]")
    legend = swatch_colors(page, "#legend")
    assert len(legend) >= 4, page.inner_text("#legend")
    page.uncheck("#show-boxes")  # only points on screen
    page.wait_for_timeout(200)
    pixels = stage_pixels(page)
    background = pixels_near(pixels, (0x15, 0x17, 0x1C), 1)
    assert background < 0.9 * pixels.shape[0] * pixels.shape[1], "the 3D view is blank"
    drawn = [rgb for rgb in legend if pixels_near(pixels, rgb) >= 30]
    assert len(drawn) >= 4, f"only {len(drawn)} of the legend colours {legend} are on screen"
    page.check("#show-boxes")
    record.assert_clean()


def test_detection_boxes_are_drawn(loaded):
    page, record = loaded  # the load's own errors are the first test's to report
    count = int(page.get_attribute("#box-count", "data-count"))
    assert count >= 1
    assert page.locator("#boxes li").count() == count
    assert page.locator("#overlay .box-label").count() == count
    with_boxes = stage_pixels(page)
    page.uncheck("#show-boxes")
    page.wait_for_timeout(200)
    without = stage_pixels(page)
    page.check("#show-boxes")
    changed = np.any(with_boxes != without, axis=-1).sum()
    assert changed > 200, f"the box wireframes changed only {changed} pixels"
    record.assert_clean()


def test_view_camera_matches_the_service_convention(loaded):
    """The camera sent to /v1/render projects the shown points where three.js draws them (OpenCV axes, pixel
    centres at integer coordinates, the display shift undone)."""
    page, _ = loaded
    found = page.evaluate("""() => {
        const {view, state} = window.viewer;
        const camera = view.serviceCamera(128, state.shift);
        const position = view.points.geometry.getAttribute('position');
        const p = view.camera.position.clone();
        const points = [], pixels = [];
        for (let i = 0; i < position.count; i += Math.floor(position.count / 200)) {
            p.fromBufferAttribute(position, i);
            const world = [p.x + state.shift[0], p.y + state.shift[1], p.z + state.shift[2]];
            p.project(view.camera);
            if (Math.abs(p.x) > 1 || Math.abs(p.y) > 1 || Math.abs(p.z) > 1) continue;
            points.push(world);
            pixels.push([(p.x + 1) / 2 * camera.width - 0.5, (1 - p.y) / 2 * camera.height - 0.5]);
        }
        return {camera, points, pixels};
    }""")
    K, w2c = np.array(found["camera"]["K"]), np.array(found["camera"]["world_to_camera"])
    points = np.array(found["points"])
    assert len(points) > 100
    cam = points @ w2c[:3, :3].T + w2c[:3, 3]
    assert (cam[:, 2] > 0).all(), "points in view must lie in front of the OpenCV camera (+z forward)"
    projected = cam @ K.T
    projected = projected[:, :2] / projected[:, 2:]
    # the height is rounded to whole pixels, so the aspect ratios differ by < 1 px over the image
    assert np.abs(projected - np.array(found["pixels"])).max() < 0.6


def test_npy_reader_matches_numpy(loaded):
    """The page's own NPY reader (static/viewer/npy.js) on files numpy wrote: dtypes, shapes, header versions."""
    import base64

    page, _ = loaded
    rng = np.random.default_rng(0)
    cases = [(rng.normal(size=(3, 4)).astype(dtype), version) for dtype in ("<f4", "<f8", "<f2") for version in
             ((1, 0), (2, 0))]
    cases += [(rng.integers(-100, 100, size=7).astype(dtype), (1, 0)) for dtype in ("<i4", "<i8", "<i2", "<u2", "u1")]
    cases += [(np.array(2.5, dtype="<f4"), (3, 0)), (np.zeros((0, 6), dtype="<f4"), (1, 0))]
    files = []
    for array, version in cases:
        buffer = io.BytesIO()
        np.lib.format.write_array(buffer, array, version=version)
        files.append(base64.b64encode(buffer.getvalue()).decode())
    parsed = page.evaluate("""async (files) => {
        const { parseNpy } = await import(new URL('static/viewer/npy.js', document.baseURI).href);
        return files.map((b64) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const { shape, data } = parseNpy(bytes.buffer);
            return { shape, values: Array.from(data, Number) };
        });
    }""", files)
    for (array, version), got in zip(cases, parsed):
        assert got["shape"] == list(array.shape), (array.dtype, version)
        np.testing.assert_array_equal(np.array(got["values"], dtype=np.float64), array.astype(np.float64).ravel())


def test_feature_pca_and_novel_view(loaded):
    page, record = loaded
    record.clear()  # the load's own errors are the first test's to report
    page.click("#pca")
    status = wait_idle(page)
    assert page.is_checked("input[name=mode][value=pca]"), status
    pixels = stage_pixels(page)
    assert len(np.unique(pixels.reshape(-1, 3) // 8, axis=0)) > 50, "PCA colours should vary smoothly"
    page.select_option("#render-width", "64")
    page.click("#render")
    status = wait_idle(page)
    assert page.is_visible("#render-image"), status
    size = page.eval_on_selector("#render-image", "img => [img.naturalWidth, img.naturalHeight]")
    assert size[0] == 64 and size[1] >= 1, status
    record.assert_clean()


def test_docs_and_redoc_render_offline(browser, server):
    with offline_page(browser) as (page, record):
        page.goto(server.url + "/docs")
        page.wait_for_selector(".swagger-ui .opblock", timeout=30_000)
        assert page.locator(".swagger-ui .opblock").count() >= 8
        assert "PonderV2 inference service" in page.inner_text(".swagger-ui .info")
        record.assert_clean()
    with offline_page(browser) as (page, record):
        page.goto(server.url + "/redoc")
        page.locator("h2", has_text="Semantic segmentation of a point cloud").first.wait_for(timeout=30_000)
        record.assert_clean()


# ---- HTTP-level checks (no browser) -------------------------------------------------------------------------


def test_pages_reference_only_local_assets(server):
    for path in ("/", "/docs", "/redoc"):
        answer = httpx.get(server.url + path)
        assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/html")
        links = re.findall(r'(?:src|href)="([^"]+)"', answer.text)
        assert links and not [u for u in links if re.match(r"^(https?:)?//", u)], (path, links)
        for link in links:
            if not link.startswith(("data:", "#")) and link not in ("docs", "redoc"):
                target = link if link.startswith("/") else "/" + link
                assert httpx.get(server.url + target).status_code == 200, link


def test_static_files_stay_inside_the_package(server):
    assert httpx.get(server.url + "/static/vendor/three/LICENSE").status_code == 200
    for path in ("/static/%2e%2e/app.py", "/static/..%2Fapp.py", "/static/vendor/../../app.py", "/static/nothing"):
        assert httpx.get(server.url + path).status_code == 404, path


def test_display_points_follow_the_row_rule(server):
    data = np.load(SAMPLE)
    answer = httpx.post(server.url + "/v1/viewer/points", params={"filename": "room.npz", "max_points": 1000},
                        content=SAMPLE.read_bytes(), headers={"Accept": "application/x-npy"}, timeout=60)
    assert answer.status_code == 200, answer.text
    points = np.load(io.BytesIO(answer.content), allow_pickle=False)
    rows = np.arange(1000) * len(data["coord"]) // 1000  # the documented rule, floor(i * N / D)
    offset = np.array(json.loads(answer.headers["x-ponder-offset"]))
    assert points.shape == (1000, 6) and answer.headers["x-ponder-num-points"] == str(len(data["coord"]))
    np.testing.assert_allclose(points[:, :3], data["coord"][rows] - offset, atol=1e-5)
    np.testing.assert_allclose(points[:, 3:], data["color"][rows] / 255.0, atol=1e-6)
    bad = httpx.post(server.url + "/v1/viewer/pca", params={"filename": "x.ply"}, content=b"not a cloud", timeout=60)
    assert bad.status_code in (415, 422), bad.text


def test_pca_colours_are_affine_in_the_model_features(server):
    """Each PCA colour channel is (up to uint8 rounding, away from the clipped ends) an affine function of the
    features /v1/features gives for the same points, and the components come in decreasing variance."""
    params = {"filename": "room.npz"}
    body = SAMPLE.read_bytes()
    pca = httpx.post(server.url + "/v1/viewer/pca", params={**params, "max_points": 4000}, content=body,
                     headers={"Accept": "application/x-npy"}, timeout=120)
    assert pca.status_code == 200, pca.text
    rgb = np.load(io.BytesIO(pca.content), allow_pickle=False)
    explained = json.loads(pca.headers["x-ponder-explained-variance"])
    assert rgb.shape == (4000, 3) and rgb.dtype == np.uint8
    assert explained == sorted(explained, reverse=True) and 0 < sum(explained) <= 1
    voxel = httpx.post(server.url + "/v1/features", params={**params, "output": "per_voxel"}, content=body,
                       headers={"Accept": "application/x-npz"}, timeout=120)
    assert voxel.status_code == 200, voxel.text
    arrays = np.load(io.BytesIO(voxel.content), allow_pickle=False)
    num_points = len(arrays["point_to_voxel"])
    rows = np.arange(4000) * num_points // 4000
    features = arrays["features"][arrays["point_to_voxel"][rows]].astype(np.float64)
    design = np.column_stack([features, np.ones(len(rows))])
    for channel in range(3):
        inside = (rgb[:, channel] > 0) & (rgb[:, channel] < 255)
        assert inside.sum() > 1000
        coef, *_ = np.linalg.lstsq(design[inside], rgb[inside, channel].astype(np.float64), rcond=None)
        residual = design[inside] @ coef - rgb[inside, channel]
        assert np.abs(residual).max() < 1.0, (channel, np.abs(residual).max())
        assert rgb[:, channel].std() > 20  # spread over the colour range, not a flat colour


def holed_sample(tmp_path: Path, every: int = 5) -> tuple[Path, np.ndarray]:
    """The sample with every ``every``-th row's coordinates NaN (like the holes of an organised depth-camera
    cloud), written by numpy; returns the file and the NaN mask."""
    data = dict(np.load(SAMPLE))
    holes = np.zeros(len(data["coord"]), dtype=bool)
    holes[::every] = True
    data["coord"] = data["coord"].copy()
    data["coord"][holes] = np.nan
    path = tmp_path / "holes.npz"
    np.savez(path, **data)
    return path, holes


def test_viewer_routes_keep_nan_holes_in_the_row_rule(server, tmp_path):
    """Clouds with NaN rows are shown, not refused: their display rows come back NaN (points) and black (PCA),
    every other row as for the cloud without holes; ``invalid=error`` refuses both routes like the model routes."""
    path, holes = holed_sample(tmp_path)
    body = path.read_bytes()
    params = {"filename": "holes.npz", "max_points": 3000}
    rows = np.arange(3000) * len(holes) // 3000
    answer = httpx.post(server.url + "/v1/viewer/points", params=params, content=body, timeout=60)
    assert answer.status_code == 200, answer.text
    points = np.load(io.BytesIO(answer.content), allow_pickle=False)
    assert np.isnan(points[holes[rows], :3]).all() and np.isfinite(points[~holes[rows]]).all()
    coord = np.load(path)["coord"]
    offset = np.array(json.loads(answer.headers["x-ponder-offset"]))
    np.testing.assert_allclose(points[~holes[rows], :3], coord[rows][~holes[rows]] - offset, atol=1e-5)
    pca = httpx.post(server.url + "/v1/viewer/pca", params=params, content=body, timeout=120)
    assert pca.status_code == 200, pca.text
    rgb = np.load(io.BytesIO(pca.content), allow_pickle=False)
    assert rgb.shape == (3000, 3) and pca.headers["x-ponder-num-points"] == str(len(holes))
    assert (rgb[holes[rows]] == 0).all() and rgb[~holes[rows]].std(axis=0).min() > 20
    for route in ("points", "pca"):
        refused = httpx.post(server.url + f"/v1/viewer/{route}", params={**params, "invalid": "error"},
                             content=body, timeout=60)
        assert refused.status_code == 422 and "NaN" in refused.json()["detail"], refused.text


def test_viewer_shows_a_cloud_with_nan_holes(browser, server, tmp_path):
    """An uploaded cloud with NaN rows loads, its finite display rows are drawn, and segmentation colours them
    by the labels of their own input rows."""
    path, holes = holed_sample(tmp_path)
    with offline_page(browser) as (page, record):
        page.goto(server.url + "/")
        page.wait_for_selector("#segment-model option[value=default]", state="attached")
        page.uncheck("#auto")
        page.set_input_files("#file", str(path))
        page.wait_for_function("document.getElementById('cloud-info').dataset.shown !== undefined", timeout=WAIT_MS)
        wait_idle(page)
        shown = int(page.get_attribute("#cloud-info", "data-shown"))
        count = min(len(holes), 200_000)
        display = np.arange(count) * len(holes) // count
        assert shown == int((~holes[display]).sum()), page.inner_text("#cloud-info")
        found = page.evaluate("""() => {
            const {view, state} = window.viewer;
            const position = view.points.geometry.getAttribute('position');
            return {count: position.count, finite: Array.from(position.array).every(Number.isFinite),
                    rows: Array.from(state.rows.slice(0, 50))};
        }""")
        assert found["count"] == shown and found["finite"]
        assert not holes[np.array(found["rows"], dtype=np.int64)].any()
        page.click("#segment")
        wait_idle(page)
        assert "failed" not in page.inner_text("#status"), page.inner_text("#status")
        assert page.locator("#legend li").count() >= 2
        record.assert_clean()

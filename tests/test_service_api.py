"""End-to-end tests of the gateway against a real uvicorn process serving the fixture checkpoints
(``--models DIR`` style: ``ppt`` and ``spunet``), compared with the Predictor run in this process."""

from __future__ import annotations

import io
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest_service import (PPT, SPUNET, look_at, npz_bytes, png_bytes, render_planes,  # noqa: E402
                              require_fixtures, scene, start_gateway, write_format)

FORMATS = ("ply", "las", "laz", "npy", "npz", "pcd", "xyz", "txt", "bin")
NPY, NPZ, ARROW = "application/x-npy", "application/x-npz", "application/vnd.apache.arrow.stream"
MAX_POINTS = 40_000
MAX_JSON = 300_000


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """The gateway process and, loaded here while it starts, the same models as Predictors."""
    require_fixtures()
    from model.inference import load_predictor

    models = tmp_path_factory.mktemp("models")
    (models / "ppt.pth").symlink_to(PPT)
    (models / "spunet.pth").symlink_to(SPUNET)
    env = {"PONDER_MODELS_DIR": str(models), "PONDER_DEFAULT_MODEL": "spunet", "PONDER_MAX_POINTS": str(MAX_POINTS),
           "PONDER_MAX_UPLOAD_BYTES": str(8_000_000), "PONDER_MAX_JSON_VALUES": str(MAX_JSON),
           "PONDER_MAX_BATCH": "8", "PONDER_MAX_WAIT_MS": "50"}
    server = start_gateway(env, tmp_path_factory.mktemp("logs"))
    try:
        predictors = {"spunet": load_predictor(SPUNET), "ppt": load_predictor(PPT)}
        predictors["spunet"].features(scene(500))  # warm-up while the server imports
        yield server.wait_ready(), predictors
    finally:
        server.stop()


@pytest.fixture(scope="module")
def server(stack):
    return stack[0]


@pytest.fixture(scope="module")
def predictors(stack):
    return stack[1]


@pytest.fixture(scope="module")
def small():
    return scene(2000, seed=1)


def parallel(calls):
    """Run zero-argument callables concurrently (the server merges them into few forward passes)."""
    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        return list(pool.map(lambda call: call(), calls))


def reference_features(predictor, clouds) -> list[np.ndarray]:
    """Per-point features of several clouds from one batched forward pass in this process."""
    voxels = [predictor.prepare(c) for c in clouds]
    return [f[v.point_to_voxel] for f, v in zip(predictor.encode(voxels), voxels)]


def post(server, route: str, body: bytes, accept: str = NPY, headers: dict | None = None, **params) -> httpx.Response:
    return httpx.post(server.url + route, content=body, params=params, timeout=120,
                      headers={"Accept": accept, "Content-Type": "application/octet-stream", **(headers or {})})


def npy(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.load(io.BytesIO(response.content), allow_pickle=False)


def npz(response: httpx.Response) -> dict[str, np.ndarray]:
    assert response.status_code == 200, response.text
    with np.load(io.BytesIO(response.content), allow_pickle=False) as archive:
        return {k: archive[k] for k in archive.files}


def test_health_readiness_and_models(server):
    assert httpx.get(server.url + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(server.url + "/readyz").json()
    assert ready["ready"] and set(ready["models"]) == {"ppt", "spunet"}
    listing = httpx.get(server.url + "/v1/models").json()
    assert listing["default_model"] == "spunet" and listing["worker"] == "inprocess"
    ppt = next(m for m in listing["models"] if m["name"] == "ppt")
    assert ppt["conditions"] == ["Structured3D", "ScanNet", "S3DIS"] and ppt["default_condition"] == "ScanNet"
    assert len(ppt["classes"]["S3DIS"]) == 13 and ppt["input_features"] == ["color", "normal"]
    assert ppt["feature_dim"] == 24 and ppt["can_segment"] and ppt["version"]


@pytest.fixture(scope="module")
def format_results(server, predictors, small, tmp_path_factory):
    """Every format written with its own library, sent concurrently; the Predictor's answer on the same file."""
    from model.pointcloud.readers import read_point_cloud

    folder = tmp_path_factory.mktemp("formats")
    paths = [write_format(small, folder / f"scene.{fmt}") for fmt in FORMATS]
    responses = parallel([lambda p=p: post(server, "/v1/features", p.read_bytes(), filename=p.name) for p in paths])
    expected = reference_features(predictors["spunet"], [read_point_cloud(p) for p in paths])
    return dict(zip(FORMATS, zip(responses, expected)))


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_input_format_matches_the_predictor(format_results, small, fmt):
    response, expected = format_results[fmt]
    got = npy(response)
    assert got.shape == (len(small), 24) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    if fmt in ("las", "laz", "xyz", "txt", "bin"):  # sources without normals (or colours) are filled
        assert "normal" in json.loads(response.headers["x-ponder-filled"])


def test_every_way_of_naming_the_format_works(server, small):
    body = npz_bytes(small)
    reference, *ways = parallel([
        lambda: post(server, "/v1/features", body, format="npz"),
        lambda: post(server, "/v1/features", body, headers={"Content-Type": "application/vnd.ponder.npz"}),
        lambda: post(server, "/v1/features", body, filename="room.NPZ"),
        lambda: post(server, "/v1/features", body, headers={"Content-Disposition": 'attachment; filename="x.npz"'}),
        lambda: post(server, "/v1/features", body),  # magic bytes
        lambda: httpx.post(server.url + "/v1/features", files={"file": ("room.npz", body)}, headers={"Accept": NPY},
                           timeout=120),
    ])
    for response in ways:
        np.testing.assert_allclose(npy(response), npy(reference), atol=1e-5, rtol=0)


def test_answer_formats_agree(server, small):
    from service.encoding import arrow_available

    body = npz_bytes(small)
    plain, as_json, as_npz, half, voxel, preferred, arrow = parallel([
        lambda: post(server, "/v1/features", body),
        lambda: post(server, "/v1/features", body, accept="application/json"),
        lambda: post(server, "/v1/features", body, accept=NPZ),
        lambda: post(server, "/v1/features", body, dtype="float16"),
        lambda: post(server, "/v1/features", body, accept=NPZ, output="per_voxel"),
        lambda: post(server, "/v1/features", body, accept="application/json;q=0.5, application/x-npz"),
        lambda: post(server, "/v1/features", body, accept=ARROW) if arrow_available() else None,
    ])
    as_npy = npy(plain)
    assert plain.headers["content-length"] == str(len(plain.content))
    as_json = as_json.json()
    assert as_json["features_shape"] == [len(small), 24] and as_json["num_points"] == len(small)
    np.testing.assert_allclose(np.array(as_json["features"], np.float32), as_npy, atol=1e-5)
    np.testing.assert_allclose(npz(as_npz)["features"], as_npy, atol=1e-5, rtol=0)
    half = npy(half)
    assert half.dtype == np.float16 and np.allclose(half, as_npy, atol=1e-2, rtol=1e-3)
    voxel = npz(voxel)
    assert voxel["grid_coord"].shape == (len(voxel["features"]), 3)
    np.testing.assert_allclose(voxel["features"][voxel["point_to_voxel"]], as_npy, atol=1e-5, rtol=0)
    assert preferred.headers["content-type"].startswith(NPZ)  # q-values honoured
    if arrow is not None:
        import pyarrow as pa

        table = pa.ipc.open_stream(arrow.content).read_all()
        features = np.stack(table.column("features").to_numpy(zero_copy_only=False))
        np.testing.assert_allclose(features, as_npy, atol=1e-5, rtol=0)
        assert json.loads(table.schema.metadata[b"num_points"]) == len(small)


def test_answers_that_a_format_cannot_carry_are_refused_with_a_pointer(server, small):
    body = npz_bytes(small)
    several = post(server, "/v1/features", body, accept=NPY, output="per_voxel")
    assert several.status_code == 406 and "x-npz" in several.json()["detail"]
    big = post(server, "/v1/features", npz_bytes(scene()), accept="application/json")
    assert big.status_code == 406 and "PONDER_MAX_JSON_VALUES" in big.json()["detail"]
    assert "application/x-npy" in big.json()["detail"]
    html = post(server, "/v1/features", body, accept="text/html")
    assert html.status_code == 406 and "available formats" in html.json()["detail"]


def test_segment_with_conditions_matches_the_predictor(server, predictors, small):
    body = npz_bytes(small)
    cases = (("S3DIS", 13), (None, 20))  # None: the default condition, ScanNet
    answers = parallel([lambda c=c: post(server, "/v1/segment", body, accept=NPZ, model="ppt", logits="true",
                                         **({"condition": c} if c else {})) for c, _ in cases])
    for (condition, classes), response in zip(cases, answers):
        got = npz(response)
        expected = predictors["ppt"].segment(small, condition=condition)
        assert tuple(got["class_names"]) == expected.class_names and len(got["class_names"]) == classes
        np.testing.assert_allclose(got["logits"], expected.logits, atol=1e-5, rtol=0)
        agree = (got["labels"] == expected.labels).mean()
        assert agree > 0.999  # ties within 1e-5 could flip a label
    as_json = post(server, "/v1/segment", body, accept="application/json").json()
    assert as_json["model"] == "spunet" and len(as_json["labels"]) == len(small)
    assert as_json["class_names"][:2] == ["wall", "floor"]


def test_precise_mode_is_the_official_tester(server, predictors):
    """mode=precise runs the 13-augmentation, fragment-voting tester on the model thread: the same labels and
    log-probabilities as the Predictor's precise mode here; fast answers say they are fast."""
    cloud = scene(1500, seed=4)
    body = npz_bytes(cloud)
    precise = npz(post(server, "/v1/segment", body, accept=NPZ, model="ppt", condition="S3DIS", logits="true",
                       mode="precise"))
    expected = predictors["ppt"].segment(cloud, condition="S3DIS", precise=True)
    np.testing.assert_allclose(precise["logits"], expected.logits, atol=1e-5, rtol=0)
    assert (precise["labels"] == expected.labels).mean() > 0.999
    assert str(precise["mode"]) == "precise" and int(precise["augmentations"]) == 13
    fast = predictors["ppt"].segment(cloud, condition="S3DIS")
    assert not np.allclose(fast.logits, expected.logits, atol=1e-3)  # really another computation
    as_json = post(server, "/v1/segment", body, accept="application/json", mode="fast").json()
    assert as_json["mode"] == "fast" and len(as_json["labels"]) == len(cloud)
    bad = post(server, "/v1/segment", body, accept=NPZ, mode="slow")
    assert bad.status_code == 422 and "mode" in bad.json()["detail"]


def test_rgbd_views_are_fused_then_encoded(server, predictors):
    from service.rgbd import Camera, RGBDView, fuse_views

    K = np.array([[60.0, 0, 40.0], [0, 60.0, 30.0], [0, 0, 1]])
    eyes = (np.array([0.5, -1.0, 1.5]), np.array([0.3, 1.2, 1.2]))
    files, cameras, views = {}, {}, []
    for i, eye in enumerate(eyes):
        pose = look_at(eye, np.array([1.5, 0.0, 0.3]))
        depth, color = render_planes(K, pose, 80, 60)
        files[f"depth_{i}"] = (f"d{i}.png", png_bytes(depth), "image/png")
        files[f"color_{i}"] = (f"c{i}.png", png_bytes(color), "image/png")
        cameras[str(i)] = {"K": K.tolist(), "world_to_camera": np.linalg.inv(pose).tolist()}
        views.append(RGBDView(depth=depth, color=color, camera=Camera(K, pose), name=str(i)))
    files["cameras"] = ("cameras.json", json.dumps({"views": cameras}).encode(), "application/json")
    response = httpx.post(server.url + "/v1/features", files=files, headers={"Accept": NPZ}, timeout=120,
                          params={"output": "per_voxel"})
    got = npz(response)
    fused = fuse_views(views, depth_scale=1000.0, voxel_size=0.01)
    expected = predictors["spunet"].features(fused)
    assert len(got["point_to_voxel"]) == len(fused)
    np.testing.assert_allclose(got["coord"], fused.coord, atol=1e-6)  # the fused cloud rides along in NPZ
    np.testing.assert_allclose(got["features"], expected.voxel_features, atol=1e-5, rtol=0)
    missing = dict(files)
    del missing["cameras"]
    bad = httpx.post(server.url + "/v1/features", files=missing, timeout=60)
    assert bad.status_code == 400 and "cameras" in bad.json()["detail"]


def _nan_cloud() -> bytes:
    cloud = scene(500)
    coord = cloud.coord.copy()
    coord[7] = np.nan
    buffer = io.BytesIO()
    np.savez(buffer, coord=coord, color=cloud.color, normal=cloud.normal)
    return buffer.getvalue()


def _too_many_points() -> bytes:
    coord = np.random.default_rng(0).uniform(0, 4, (MAX_POINTS + 1, 3)).astype(np.float32)
    buffer = io.BytesIO()
    np.save(buffer, coord)
    return buffer.getvalue()


BAD_INPUTS = [
    ("empty body", b"", {}, {}, 400, "body is empty"),
    ("garbage, no format", b"\x00\x01garbage" * 10, {}, {}, 415, "cannot tell the point-cloud format"),
    ("unknown format", b"1 2 3", {"format": "obj"}, {}, 415, "unknown point-cloud format 'obj'"),
    ("unknown content type", b"1 2 3", {}, {"Content-Type": "image/png"}, 415, "unsupported Content-Type"),
    ("garbage as ply", b"\x00\x01garbage" * 10, {"format": "ply"}, {}, 422, "not a valid PLY"),
    ("gzip upload", b"\x1f\x8b\x08\x00" + bytes(60), {"filename": "scan.ply.gz"}, {}, 415,
     "scan.ply.gz is gzip-compressed; decompress it"),
    ("gzip under a ply name", b"\x1f\x8b\x08\x00" + bytes(60), {"filename": "scan.ply"}, {}, 415, "gzip-compressed"),
    ("gzip with ?format=", b"\x1f\x8b\x08\x00" + bytes(60), {"format": "ply"}, {}, 422,
     "gzip-compressed; decompress it first"),
    ("NaN coordinates", None, {"invalid": "error"}, {}, 422, "NaN or infinite coordinates"),
    ("too many points", None, {"format": "npy"}, {}, 413, "PONDER_MAX_POINTS"),
    ("too large upload", b"x" * 8_000_001, {"format": "xyz"}, {}, 413, "PONDER_MAX_UPLOAD_BYTES"),
    ("unknown condition", b"", {"model": "ppt", "condition": "Mars"}, {}, 422, "unknown condition 'Mars'"),
    ("condition on a plain model", b"", {"condition": "S3DIS"}, {}, 422, "takes no condition"),
    ("unknown model", b"", {"model": "nope"}, {}, 404, "unknown model 'nope'"),
    ("bad parameter", b"", {"grid_size": "-1"}, {}, 422, "grid_size"),
    ("unknown parameter", b"", {"colour": "1"}, {}, 422, "colour"),
    ("deadline", None, {"timeout_s": "0.001"}, {}, 504, "did not finish within"),
]


@pytest.mark.parametrize("name, body, params, headers, status, message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_gets_its_status_and_message(server, name, body, params, headers, status, message):
    if body is None:
        body = {"NaN coordinates": _nan_cloud, "too many points": _too_many_points}.get(name, lambda: npz_bytes(scene()))()
    response = post(server, "/v1/features", body, headers=headers, **params)
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    problem = response.json()
    assert problem["status"] == status and message in problem["detail"], problem
    assert problem["request_id"] == response.headers["x-request-id"]


def test_request_id_is_echoed_and_logged_as_json(server, small):
    response = post(server, "/v1/features", npz_bytes(small), headers={"X-Request-ID": "test-req-42"})
    assert response.status_code == 200 and response.headers["x-request-id"] == "test-req-42"
    generated = httpx.get(server.url + "/healthz").headers["x-request-id"]
    assert len(generated) >= 16
    access = [line for line in server.log_lines() if line.get("request_id") == "test-req-42"]
    assert any(line.get("path") == "/v1/features" and line.get("status") == 200 for line in access)
    assert all({"ts", "level", "logger", "msg"} <= set(line) for line in server.log_lines())


def test_concurrent_clients_each_get_their_own_result(server, predictors):
    clouds = [scene(1000 + 300 * i, seed=10 + i) for i in range(8)]
    results = parallel([lambda c=c: npy(post(server, "/v1/features", npz_bytes(c))) for c in clouds])
    for got, cloud, expected in zip(results, clouds, reference_features(predictors["spunet"], clouds)):
        assert got.shape == (len(cloud), 24)
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_metrics_expose_traffic_queue_batches_and_points(server, small):
    post(server, "/v1/features", npz_bytes(small))
    text = httpx.get(server.url + "/metrics").text
    assert 'ponder_http_requests_total{method="POST",route="/v1/features",status="200"}' in text
    assert "ponder_http_request_duration_seconds_bucket" in text
    for name in ("ponder_queue_depth", "ponder_batch_size_count", "ponder_worker_duration_seconds_count",
                 'ponder_points_processed_total{route="/v1/features"}'):
        assert name in text, name


def test_python_client(server, predictors, small, tmp_path):
    from service.client import PonderClient, PonderError

    path = write_format(small, tmp_path / "room.ply")
    expected = predictors["spunet"].features(small).point_features()
    with PonderClient(server.url) as client:
        assert client.health()["ready"]
        assert {m["name"] for m in client.models()} == {"ppt", "spunet"}
        np.testing.assert_allclose(client.features(path), expected, atol=1e-5, rtol=0)
        np.testing.assert_allclose(client.features(small), expected, atol=1e-5, rtol=0)
        np.testing.assert_allclose(client.features(path.read_bytes(), format="ply"), expected, atol=1e-5, rtol=0)
        voxels = client.voxel_features(small)
        np.testing.assert_allclose(voxels.point_features(), expected, atol=1e-5, rtol=0)
        seg = client.segment(small, model="ppt", condition="S3DIS", logits=True)
        assert len(seg.class_names) == 13 and seg.logits.shape == (len(small), 13)
        precise = client.segment(small, model="ppt", condition="S3DIS", mode="precise")
        expected_precise = predictors["ppt"].segment(small, condition="S3DIS", precise=True)
        assert (precise.labels == expected_precise.labels).mean() > 0.999
        with pytest.raises(PonderError) as error:
            client.features(small, model="missing")
        assert error.value.status == 404 and "missing" in error.value.detail and error.value.request_id


def test_streamed_upload_is_cut_off_once_over_the_limit(server):
    def chunks():  # no Content-Length: the limit must be enforced while reading
        for _ in range(40):
            yield b"1.0 2.0 3.0\n" * 50_000  # 600 kB each, 24 MB in all

    response = httpx.post(server.url + "/v1/features", content=chunks(), params={"format": "xyz"}, timeout=60)
    assert response.status_code == 413 and "PONDER_MAX_UPLOAD_BYTES" in response.json()["detail"]


def test_nan_points_are_dropped_and_answers_keep_the_input_length(server, predictors):
    """invalid=drop (the default): NaN rows get label -1 / NaN features, the count is in a header; up=y
    rotates the upload and says so."""
    body = _nan_cloud()
    got = npz(post(server, "/v1/segment", body, accept=NPZ, logits="true"))
    assert len(got["labels"]) == 500 and got["labels"][7] == -1 and (np.delete(got["labels"], 7) >= 0).all()
    assert np.isnan(got["logits"][7]).all() and np.isfinite(np.delete(got["logits"], 7, axis=0)).all()
    response = post(server, "/v1/features", body, accept=NPY, up="y")
    assert response.status_code == 200 and response.headers["x-ponder-dropped-points"] == "1"
    assert json.loads(response.headers["x-ponder-up-rotation"]) == [[0, 0, 1], [1, 0, 0], [0, 1, 0]]


def test_an_organised_pcd_answers_flat_rows_with_its_height_and_width(server, tmp_path):
    """A depth camera's organised PCD (NaN holes): flat row-major answers; grid_shape [H, W] in the header,
    and in the NPZ body too (a client that keeps only the file can still reshape)."""
    from tests.test_cli_organised import HEIGHT, WIDTH, _write_organised_pcd

    holes = np.zeros(HEIGHT * WIDTH, bool)
    holes[:WIDTH] = True
    data = (tmp_path / "frame.pcd")
    _write_organised_pcd(data, holes)
    flat = post(server, "/v1/features", data.read_bytes(), format="pcd")
    assert flat.status_code == 200 and json.loads(flat.headers["x-ponder-grid-shape"]) == [HEIGHT, WIDTH]
    features = npy(flat)
    assert len(features) == HEIGHT * WIDTH and np.isnan(features[:WIDTH]).all() and np.isfinite(features[WIDTH:]).all()
    got = npz(post(server, "/v1/segment", data.read_bytes(), accept=NPZ, format="pcd"))
    assert got["grid_shape"].tolist() == [HEIGHT, WIDTH] and int(got["dropped_points"]) == WIDTH
    assert got["labels"].reshape(HEIGHT, WIDTH)[0].tolist() == [-1] * WIDTH


def test_a_ply_file_under_a_text_name_is_read_as_ply(server, tmp_path):
    """The readers' rule in the service too: a PLY file saved as .xyz is PLY (its first line says so)."""
    cloud = scene(500)
    data = write_format(cloud, tmp_path / "scan.ply").read_bytes()
    as_xyz = post(server, "/v1/features", data, filename="scan.xyz")
    as_ply = post(server, "/v1/features", data, filename="scan.ply")
    assert np.array_equal(npy(as_xyz), npy(as_ply)) and len(npy(as_xyz)) == 500
    multipart = httpx.post(server.url + "/v1/features", files={"file": ("scan.xyz", data, "text/plain")},
                           headers={"Accept": NPY}, timeout=120)
    assert np.array_equal(npy(multipart), npy(as_ply))


def test_detect_without_a_model_on_a_server_that_has_no_detector_says_so(server):
    response = post(server, "/v1/detect", npz_bytes(scene(500)), accept="application/json")
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert detail.startswith("no served model can detect") and "detection head" in detail, detail

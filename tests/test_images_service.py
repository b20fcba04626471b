"""Posed images without depth through a real gateway (uvicorn on a loopback port): /v1/features and /v1/segment
with multipart image_<id> parts + cameras answer what the image models compute in process; every bad input
gets a 4xx naming the problem, and the size limits are enforced from the image headers, before decoding."""

from __future__ import annotations

import io
import json
import struct
import sys
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest_service import gateway, look_at, png_bytes, render_planes  # noqa: E402

from model.images import ImageModelConfig, ImageRenderModel, check_views, image_features, load_image_model  # noqa: E402
from model.images.checkpoint import save_image_model  # noqa: E402
from model.images.segment import (ImageSegmentModel, load_image_segment_model, segment_config_from,  # noqa: E402
                                  segment_from_images)
from model.render.cameras import Camera  # noqa: E402

W, H = 40, 30
K = np.array([[32.0, 0, (W - 1) / 2], [0, 32.0, (H - 1) / 2], [0, 0, 1]])
BOUNDS = [[0.0, -1.5, 0.0], [2.2, 1.5, 1.5]]
TARGET = np.array([1.5, 0.0, 0.4])
EYES = [np.array([0.2, -1.2, 1.3]), np.array([0.1, 1.1, 1.2]), np.array([-0.4, 0.0, 1.4]),
        np.array([0.3, -0.5, 1.0]), np.array([0.3, 0.6, 0.9])]
TINY = {"backbone": {"width": 8}, "lift": {"dim": 4},
        "render": {"projection": {"out_channels": 8, "f_maps": [8, 16]}, "field": {"hidden_size": 16, "geo_dim": 8},
                   "sampler": {"num_samples": 8, "num_samples_importance": 4}, "grid_shape": [12, 12, 6]}}
CLASSES = ["wall", "floor", "chair"]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("image-models")
    render = save_image_model(ImageRenderModel(ImageModelConfig.from_dict(TINY)), root / "tiny-images")
    seg = ImageSegmentModel(segment_config_from(ImageModelConfig.from_dict(TINY), CLASSES))
    with torch.no_grad():
        seg.classifier.bias[len(CLASSES)] = -2.0  # most voxels occupied, so pixels get labels
    return {"render": render, "segment": save_image_model(seg, root / "tiny-segment")}


@pytest.fixture(scope="module")
def server(models):
    env = {"PONDER_IMAGES_CHECKPOINT": str(models["render"]), "PONDER_IMAGES_SEGMENT_CHECKPOINT": str(models["segment"]),
           "PONDER_IMAGES_MAX_VIEWS": "4", "PONDER_IMAGES_MAX_VIEW_PIXELS": "5000", "PONDER_TORCH_THREADS": "1"}
    with gateway(env) as srv:
        yield srv


def views(n: int = 3) -> tuple[list[bytes], list[dict]]:
    """Colour views of the analytic room (floor z = 0, wall x = 2) and their cameras (OpenCV axes)."""
    images, cams = [], []
    for i in range(n):
        pose = look_at(EYES[i], TARGET)
        _, color = render_planes(K, pose, W, H)
        images.append(png_bytes(color))
        cams.append({"image": str(i), "width": W, "height": H, "K": K.tolist(), "camera_to_world": pose.tolist()})
    return images, cams


def post(server, route: str, images: list[bytes], cams, accept: str = "application/x-npz", extra=None,
         cameras_part: bool = True) -> httpx.Response:
    files = [(f"image_{i}", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]
    if cameras_part:
        doc = {"cameras": cams, "bounds": BOUNDS} if isinstance(cams, list) else cams
        files.append(("cameras", ("cameras.json", json.dumps(doc).encode(), "application/json")))
    files += list((extra or {}).items())
    return httpx.post(server.url + route, files=files, headers={"Accept": accept}, timeout=120)


def posed(images: list[bytes], cams: list[dict]):
    from PIL import Image

    arrays = [np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in images]
    return check_views(arrays, [Camera.from_dict(c) for c in cams], [f"image_{i}" for i in range(len(images))])


def npz(response: httpx.Response) -> dict[str, np.ndarray]:
    assert response.status_code == 200, response.text
    with np.load(io.BytesIO(response.content), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def test_features_from_posed_images_match_the_model_in_process(server, models):
    images, cams = views()
    got = npz(post(server, "/v1/features", images, cams))
    expected = image_features(load_image_model(models["render"]), posed(images, cams), np.asarray(BOUNDS))
    assert got["features"].shape == expected.features.shape and got["features"].shape[1] == 8
    np.testing.assert_allclose(got["features"], expected.features, atol=1e-5)
    np.testing.assert_array_equal(got["centres"], expected.centres)
    np.testing.assert_array_equal(got["views_seeing"], expected.views_seeing)
    assert got["views_seeing"].min() >= 1 and got["views_seeing"].max() <= 3
    lo, hi = np.array(BOUNDS)  # the lifted cube holds the box (its longest side, 3 m, plus padding, on every axis)
    assert (got["centres"] >= (lo + hi) / 2 - 1.8).all() and (got["centres"] <= (lo + hi) / 2 + 1.8).all()
    assert str(got["model"]) == "tiny-images" and int(got["num_views"]) == 3
    assert tuple(got["lifted_grid_shape"]) == (12, 12, 6) and "grid_shape" not in got  # [H, W] of clouds only


def test_image_answers_name_the_lifted_grid_not_the_organised_shape(server):
    images, cams = views()
    binary = post(server, "/v1/features", images, cams, accept="application/x-npz")
    assert binary.status_code == 200, binary.text
    assert json.loads(binary.headers["x-ponder-lifted-grid-shape"]) == [12, 12, 6]
    assert "x-ponder-grid-shape" not in binary.headers
    with np.load(io.BytesIO(binary.content), allow_pickle=False) as z:  # the body keeps what the headers say
        assert z["lifted_grid_shape"].tolist() == [12, 12, 6] and z["bounds"].shape == (2, 3)
    as_json = post(server, "/v1/features", images, cams, accept="application/json")
    assert as_json.status_code == 200 and as_json.json()["lifted_grid_shape"] == [12, 12, 6]


def test_features_json_and_nerfstudio_transforms(server):
    images, cams = views()
    frames = []
    for c in cams:  # nerfstudio: OpenGL camera_to_world (y up, z backwards), pixel centres at +0.5, file_path
        c2w = np.asarray(c["camera_to_world"]) @ np.diag([1.0, -1.0, -1.0, 1.0])
        frames.append({"file_path": f"images/{c['image']}.png", "transform_matrix": c2w.tolist()})
    doc = {"w": W, "h": H, "fl_x": K[0, 0], "fl_y": K[1, 1], "cx": K[0, 2] + 0.5, "cy": K[1, 2] + 0.5, "frames": frames,
           "bounds": BOUNDS}
    by_json = post(server, "/v1/features", images, cams, accept="application/json")
    by_transforms = post(server, "/v1/features", images, doc, accept="application/json")
    assert by_json.status_code == 200 and by_transforms.status_code == 200, by_transforms.text
    a, b = by_json.json(), by_transforms.json()
    assert a["features_shape"] == b["features_shape"] and a["views"] == ["image_0", "image_1", "image_2"]
    np.testing.assert_allclose(np.asarray(a["features"]), np.asarray(b["features"]), atol=1e-4)


def test_segment_labels_per_voxel_and_per_input_pixel(server, models):
    images, cams = views()
    got = npz(post(server, "/v1/segment", images, cams))
    expected = segment_from_images(load_image_segment_model(models["segment"]), posed(images, cams), np.asarray(BOUNDS))
    np.testing.assert_array_equal(got["labels"], expected.labels)
    np.testing.assert_array_equal(got["pixel_labels"], expected.pixel_labels)
    assert got["pixel_labels"].shape == (3, H, W)
    assert (got["pixel_labels"] >= 0).any() and got["pixel_labels"].max() < len(CLASSES)
    assert list(got["class_names"]) == CLASSES and got["centres"].shape == (len(got["labels"]), 3)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares width x height but whose data is a few bytes (a decompression bomb's shape)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("case, status, message", [
    ("no cameras part", 400, "without a 'cameras' part"),
    ("view without pose", 422, "pose"),
    ("non-rigid pose", 422, "orthonormal"),
    ("too many views", 413, "5 image views exceed the limit of 4"),
    ("image over the pixel limit", 413, "100000x80000 = 8000000000 pixels exceed the limit of 5000"),
    ("corrupt png", 422, "image_1: the image data is corrupt"),
    ("tiff, not png or jpeg", 422, "image_1: not a readable PNG/JPEG image"),
    ("one view", 422, "at least 2 posed views"),
    ("size disagrees with intrinsics", 422, "the image is 40x30 but its camera says 44x30"),
    ("image without camera", 422, "image_2 have no camera"),
    ("not json", 422, "not valid JSON"),
    ("sees nothing", 422, "see nothing of the scene volume"),
])
def test_bad_image_uploads_get_4xx_naming_the_problem(server, case, status, message):
    images, cams = views(5 if case == "too many views" else 3)
    kwargs = {}
    if case == "no cameras part":
        kwargs["cameras_part"] = False
    elif case == "view without pose":
        del cams[1]["camera_to_world"]
    elif case == "non-rigid pose":
        cams[2]["camera_to_world"] = (np.asarray(cams[2]["camera_to_world"]) @ np.diag([2.0, 2.0, 2.0, 1.0])).tolist()
    elif case == "image over the pixel limit":
        images[2] = _png_header_only(100000, 80000)
    elif case == "corrupt png":
        data = bytearray(images[1])
        data[60:200] = bytes(140)  # IHDR intact (size readable), pixel data destroyed
        images[1] = bytes(data)
    elif case == "tiff, not png or jpeg":  # a decoder the service does not offer, whatever the part's name
        buffer = io.BytesIO()
        Image.open(io.BytesIO(images[1])).save(buffer, format="TIFF")
        images[1] = buffer.getvalue()
    elif case == "one view":
        images, cams = images[:1], cams[:1]
    elif case == "size disagrees with intrinsics":
        cams[0]["width"] = 44
    elif case == "image without camera":
        cams = cams[:2]
    elif case == "sees nothing":
        cams[1]["camera_to_world"] = look_at(np.array([1.0, -30.0, 1.0]), np.array([1.0, -60.0, 1.0])).tolist()
    if case == "not json":
        files = [(f"image_{i}", (f"{i}.png", d, "image/png")) for i, d in enumerate(images)]
        response = httpx.post(server.url + "/v1/features", files=files + [("cameras", ("c.json", b"{nope", "x"))],
                              timeout=60)
    else:
        response = post(server, "/v1/features", images, cams, **kwargs)
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert message in response.json()["detail"], response.json()["detail"]


def test_segment_refuses_precise_mode_and_unknown_image_model(server):
    images, cams = views()
    precise = httpx.post(server.url + "/v1/segment?mode=precise",
                         files=[(f"image_{i}", (f"{i}.png", d, "image/png")) for i, d in enumerate(images)]
                         + [("cameras", ("c.json", json.dumps(cams).encode(), "application/json"))], timeout=60)
    assert precise.status_code == 422 and "does not apply to images" in precise.json()["detail"]
    unknown = httpx.post(server.url + "/v1/features?model=nope",
                         files=[(f"image_{i}", (f"{i}.png", d, "image/png")) for i, d in enumerate(images)]
                         + [("cameras", ("c.json", json.dumps(cams).encode(), "application/json"))], timeout=60)
    assert unknown.status_code == 404 and "tiny-images" in unknown.json()["detail"]


def test_point_cloud_uploads_still_work_beside_images(server):
    from conftest_service import npz_bytes  # noqa: E402
    from model.pointcloud.cloud import PointCloud

    rng = np.random.default_rng(0)
    cloud = PointCloud(coord=rng.uniform(0, 2, (2000, 3)).astype(np.float32),
                       color=rng.integers(0, 255, (2000, 3)).astype(np.uint8),
                       normal=np.tile(np.float32([0, 0, 1]), (2000, 1)), source="t")
    response = httpx.post(server.url + "/v1/features", files={"file": ("scene.npz", npz_bytes(cloud))},
                          headers={"Accept": "application/x-npy"}, timeout=120)
    assert response.status_code == 200, response.text
    assert np.load(io.BytesIO(response.content)).shape[0] == 2000


def test_render_from_images(server):
    images, cams = views()
    novel = [{"width": 8, "height": 6, "fx": 6.0, "fy": 6.0, "cx": 3.5, "cy": 2.5,
              "camera_to_world": look_at(np.array([0.0, 0.0, 1.2]), TARGET).tolist()}] * 2
    response = post(server, "/v1/render", images, cams, accept="application/zip",
                    extra={"novel": ("novel.json", json.dumps(novel).encode(), "application/json")})
    assert response.status_code == 200, response.text
    import zipfile

    names = set(zipfile.ZipFile(io.BytesIO(response.content)).namelist())
    assert {"0_color.png", "1_depth.npy", "meta.json"} <= names


def test_default_image_models_and_a_missing_one(tmp_path, monkeypatch):
    from service.errors import ApiError
    from service.image_jobs import BUNDLED, ImageModels
    from service.settings import ServiceSettings

    for key in ("PONDER_IMAGES_CHECKPOINT", "PONDER_IMAGES_SEGMENT_CHECKPOINT"):
        monkeypatch.delenv(key, raising=False)
    models = ImageModels(ServiceSettings())
    if (BUNDLED / "images" / "config.json").is_file():
        assert models.path("render") == BUNDLED / "images" and models.name(models.path("render")) == "default-images"
    missing = ImageModels(ServiceSettings(images_segment_checkpoint=tmp_path / "nothing"))
    with pytest.raises(ApiError, match="no image segmentation model is served") as info:
        missing.path("segment")
    assert info.value.status == 422 and "PONDER_IMAGES_SEGMENT_CHECKPOINT" in info.value.detail
    assert [m.name for m in missing.served()] == (["default-images"] if (BUNDLED / "images").is_dir() else [])


def test_image_limits_are_service_settings_with_the_same_variables(monkeypatch):
    from service.settings import ServiceSettings

    defaults = ServiceSettings()
    assert (defaults.images_max_views, defaults.images_max_view_pixels, defaults.images_max_total_pixels,
            defaults.images_max_volume_voxels, defaults.images_max_cameras_bytes) == (32, 1 << 20, 8 << 20, 1 << 21,
                                                                                      4 << 20)
    monkeypatch.setenv("PONDER_IMAGES_MAX_VIEWS", "7")
    monkeypatch.setenv("PONDER_IMAGES_MAX_TOTAL_PIXELS", "1234")
    monkeypatch.setenv("PONDER_IMAGES_CHECKPOINT", "/some/folder")
    env = ServiceSettings()
    assert env.images_max_views == 7 and env.images_max_total_pixels == 1234
    assert str(env.images_checkpoint) == "/some/folder"


def test_models_lists_the_image_models(server, models):
    listing = httpx.get(server.url + "/v1/models", timeout=30).json()
    assert all(m["name"] not in ("tiny-images", "tiny-segment") for m in listing["models"])  # point models only
    images = {m["name"]: m for m in listing["image_models"]}
    assert images["tiny-images"] == {"name": "tiny-images", "kind": "images", "class_names": [], "feature_dim": 8,
                                     "grid_shape": [12, 12, 6], "capabilities": ["features", "render"]}
    assert images["tiny-segment"] == {"name": "tiny-segment", "kind": "images-segment", "class_names": CLASSES,
                                      "feature_dim": 8, "grid_shape": [12, 12, 6], "capabilities": ["segment"]}
    assert set(images) == {"tiny-images", "tiny-segment"}


def test_image_model_folders_are_read_once_and_an_unreadable_one_is_a_503(tmp_path):
    from model.images.segment import KIND_SEGMENT
    from service import image_jobs
    from service.errors import ApiError
    from service.image_jobs import ImageModels
    from service.settings import ServiceSettings

    assert image_jobs.KIND_SEGMENT == KIND_SEGMENT  # restated in the torch-free gateway module
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"kind": "images", "render": {"grid_shape": [4, 5, 6]}}))
    models = ImageModels(ServiceSettings(images_checkpoint=folder))
    assert models.grid(folder) == (4, 5, 6)
    (folder / "config.json").write_text("{ not json")  # read once: the served description does not change
    assert models.grid(folder) == (4, 5, 6)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{ not json")
    with pytest.raises(ApiError, match="config.json is unreadable") as info:
        ImageModels(ServiceSettings(images_checkpoint=broken)).grid(broken)
    assert info.value.status == 503

"""Python client of the gateway (httpx). Results travel as NPY/NPZ, never JSON, so large clouds stay cheap.

    with PonderClient("http://127.0.0.1:8000", api_key=None) as client:
        feats = client.features("scene.ply")             # (N, C) float32, input order
        seg = client.segment("scene.las", condition="ScanNet")
        seg.labels, seg.class_names
        found = client.detect("scene.ply", model="detector")   # found.boxes (K, 7), found.class_names
        views = client.render("scene.ply", cameras, model="ponder")  # [RenderedImage(color, depth, depth_mm)]
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import tenacity

from model.pointcloud.cloud import PointCloud
from model.render.cameras import Camera

NPY, NPZ, JSON, ZIP = "application/x-npy", "application/x-npz", "application/json", "application/zip"
RETRY_STATUSES = (429, 502, 503, 504)


class PonderError(RuntimeError):
    """An error answer from the server: HTTP status, the server's message and the request id."""

    def __init__(self, status: int, detail: str, request_id: str | None = None):
        super().__init__(f"HTTP {status}: {detail}" + (f" (request id {request_id})" if request_id else ""))
        self.status = status
        self.detail = detail
        self.request_id = request_id


@dataclass
class Segmentation:
    labels: np.ndarray  # (N,) int32 class index per input point
    class_names: tuple[str, ...]
    logits: np.ndarray | None = None  # (N, K) when asked for


@dataclass
class VoxelFeatures:
    features: np.ndarray  # (M, C) per voxel
    point_to_voxel: np.ndarray  # (N,) voxel row of each input point
    grid_coord: np.ndarray  # (M, 3) int32 voxel coordinates

    def point_features(self) -> np.ndarray:
        return self.features[self.point_to_voxel]


@dataclass
class Detections:
    boxes: np.ndarray  # (K, 7) float64 [cx, cy, cz, dx, dy, dz, yaw], metres, the input's world frame
    scores: np.ndarray  # (K,) float64, descending
    labels: np.ndarray  # (K,) int64 index into class_names
    class_names: tuple[str, ...]
    document: dict  # the whole answer (ponder-detections/1 with corners, plus model, condition, ...)


@dataclass
class RenderedImage:
    color: np.ndarray  # (H, W, 3) uint8 RGB
    depth: np.ndarray  # (H, W) float32 z-depth in metres, 0 where the ray misses the scene
    depth_mm: np.ndarray  # (H, W) uint16 millimetres (the 16-bit PNG)


Source = str | os.PathLike | bytes | PointCloud
Cameras = Camera | Mapping | Sequence[Camera | Mapping] | str | bytes | os.PathLike
Image = str | os.PathLike | bytes | np.ndarray  # a PNG file, its bytes, or the pixels


def encode_source(source: Source, format: str | None = None) -> tuple[bytes, dict[str, str]]:
    """Request body and query parameters for a path, raw file bytes or an in-memory PointCloud."""
    params: dict[str, str] = {}
    if isinstance(source, PointCloud):
        buffer = io.BytesIO()
        arrays = {"coord": source.world_coord()}  # float64 world coordinates when georeferenced
        if source.color is not None:
            arrays["color"] = source.color
        if source.normal is not None:
            arrays["normal"] = source.normal
        np.savez(buffer, **arrays)
        return buffer.getvalue(), {"format": "npz"}
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    else:
        path = Path(source)
        data = path.read_bytes()
        params["filename"] = path.name
    if format:
        params["format"] = format
    return data, params


def cameras_json(cameras: Cameras) -> str:
    """The 'cameras' part: Camera objects, camera dicts (or a transforms.json dict), JSON text, or a JSON file
    (a path, as ``Path`` or as a string that is not JSON text)."""
    if isinstance(cameras, bytes):
        return cameras.decode()
    if isinstance(cameras, str):
        if cameras.lstrip()[:1] in ("{", "["):
            return cameras
        cameras = Path(cameras)
    if isinstance(cameras, os.PathLike):
        path = Path(cameras)
        if not path.is_file():
            raise FileNotFoundError(f"camera file {path} not found (pass a path, JSON text, dicts or Camera objects)")
        return path.read_text()
    if isinstance(cameras, Camera):
        cameras = [cameras]
    if isinstance(cameras, Mapping):
        return json.dumps(dict(cameras))
    return json.dumps([c.to_dict() if isinstance(c, Camera) else dict(c) for c in cameras])


def image_bytes(image: Image, what: str) -> bytes:
    """PNG bytes of an image given as a path, PNG bytes or an array (uint16 depth / uint8 colour)."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, (str, os.PathLike)):
        return Path(image).read_bytes()
    from PIL import Image as PILImage

    array = np.asarray(image)
    if array.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"{what}: an image array must be uint16 (depth) or uint8 (colour), not {array.dtype}")
    buffer = io.BytesIO()
    PILImage.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _views(images: Mapping[str, Image] | Sequence[Image]) -> dict[str, Image]:
    if isinstance(images, Mapping):
        return {str(k): v for k, v in images.items()}
    return {str(i): image for i, image in enumerate(images)}


def rgbd_cameras_json(cameras: Cameras) -> str:
    """The RGB-D 'cameras' part ({"views": ...} of K + pose per view); Camera objects become K/world_to_camera."""
    if isinstance(cameras, Camera):
        cameras = [cameras]
    if isinstance(cameras, Sequence) and not isinstance(cameras, (str, bytes)):
        cameras = {"views": [{"K": c.K.tolist(), "world_to_camera": c.w2c.tolist()} if isinstance(c, Camera)
                             else dict(c) for c in cameras]}
    return cameras_json(cameras)


def read_views(content: bytes) -> list[RenderedImage]:
    """The images of a /v1/render zip answer, in camera order."""
    from PIL import Image

    with zipfile.ZipFile(io.BytesIO(content)) as archive:
        count = len(json.loads(archive.read("meta.json"))["views"])
        return [RenderedImage(color=np.asarray(Image.open(io.BytesIO(archive.read(f"{i}_color.png")))),
                              depth=np.load(io.BytesIO(archive.read(f"{i}_depth.npy")), allow_pickle=False),
                              depth_mm=np.asarray(Image.open(io.BytesIO(archive.read(f"{i}_depth.png")))))
                for i in range(count)]


def raise_for_problem(response: httpx.Response) -> None:
    """PonderError with the server's problem+json detail for any non-2xx answer."""
    if response.is_success:
        return
    detail, request_id = response.text, response.headers.get("x-request-id")
    try:
        body = response.json()
        detail = body.get("detail", detail)
        request_id = body.get("request_id") or request_id
    except ValueError:
        pass
    raise PonderError(response.status_code, str(detail), request_id)


def load_npy(content: bytes) -> np.ndarray:
    return np.load(io.BytesIO(content), allow_pickle=False)


def load_npz(content: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(content), allow_pickle=False) as archive:
        return {key: archive[key] for key in archive.files}


class wait_retry_after(tenacity.wait.wait_base):
    """tenacity wait: the server's ``Retry-After`` (whole seconds) when the last answer carried one, else
    exponential backoff: ``backoff_s``, then doubling."""

    def __init__(self, backoff_s: float) -> None:
        self.backoff = tenacity.wait_exponential(multiplier=backoff_s)

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        outcome = retry_state.outcome
        if outcome is not None and not outcome.failed:
            after = outcome.result().headers.get("retry-after", "")
            if after.isdigit():
                return float(after)
        return self.backoff(retry_state)


def retrying_answers(retries: int, backoff_s: float, retry_statuses: Sequence[int] = RETRY_STATUSES,
                     asynchronous: bool = False, **kwargs: Any) -> tenacity.BaseRetrying:
    """The tenacity policy of the client and ``ponder extract``: an httpx call retried ``retries`` times on
    connection errors and on answers with a status in ``retry_statuses``, waiting as :class:`wait_retry_after`.
    When the retries run out the last answer is returned (or its error raised), unless ``kwargs`` say otherwise."""
    policy = dict(stop=tenacity.stop_after_attempt(retries + 1), wait=wait_retry_after(backoff_s),
                  retry=(tenacity.retry_if_exception_type(httpx.TransportError)
                         | tenacity.retry_if_result(lambda response: response.status_code in retry_statuses)),
                  retry_error_callback=lambda state: state.outcome.result())
    policy.update(kwargs)
    return (tenacity.AsyncRetrying if asynchronous else tenacity.Retrying)(**policy)


class PonderClient:
    """Blocking client. Retries 429/502/503/504 answers and connection errors ``retries`` times."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 300.0, retries: int = 2,
                 backoff_s: float = 0.5) -> None:
        headers = {"X-API-Key": api_key} if api_key else {}
        self._http = httpx.Client(base_url=url.rstrip("/"), timeout=timeout, headers=headers)
        self.retries = retries
        self.backoff_s = backoff_s

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "PonderClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        response = retrying_answers(self.retries, self.backoff_s)(self._http.request, method, path, **kwargs)
        raise_for_problem(response)
        return response

    def _post(self, route: str, source: Source, accept: str, format: str | None, **params: Any) -> httpx.Response:
        body, query = encode_source(source, format)
        query.update({k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in params.items()
                      if v is not None})
        return self._request("POST", route, content=body, params=query,
                             headers={"Accept": accept, "Content-Type": "application/octet-stream"})

    def features(self, source: Source, *, model: str | None = None, condition: str | None = None,
                 grid_size: float | None = None, dtype: str = "float32", format: str | None = None,
                 up: str | None = None, invalid: str | None = None) -> np.ndarray:
        """(N, C) features of every input point, in input order."""
        response = self._post("/v1/features", source, NPY, format, model=model, condition=condition,
                              grid_size=grid_size, dtype=dtype, output="per_point", up=up, invalid=invalid)
        return load_npy(response.content)

    def voxel_features(self, source: Source, *, model: str | None = None, condition: str | None = None,
                       grid_size: float | None = None, dtype: str = "float32",
                       format: str | None = None, up: str | None = None,
                       invalid: str | None = None) -> VoxelFeatures:
        response = self._post("/v1/features", source, NPZ, format, model=model, condition=condition,
                              grid_size=grid_size, dtype=dtype, output="per_voxel", up=up, invalid=invalid)
        arrays = load_npz(response.content)
        return VoxelFeatures(arrays["features"], arrays["point_to_voxel"], arrays["grid_coord"])

    def segment(self, source: Source, *, model: str | None = None, condition: str | None = None,
                grid_size: float | None = None, logits: bool = False, format: str | None = None,
                mode: str = "fast", up: str | None = None, invalid: str | None = None) -> Segmentation:
        """Per-point labels; ``mode="precise"`` asks for the official test-time-augmentation mode."""
        response = self._post("/v1/segment", source, NPZ, format, model=model, condition=condition,
                              grid_size=grid_size, logits=logits, mode=mode, up=up, invalid=invalid)
        arrays = load_npz(response.content)
        return Segmentation(labels=arrays["labels"], class_names=tuple(str(n) for n in arrays["class_names"]),
                            logits=arrays.get("logits"))

    def detect(self, source: Source, *, model: str | None = None, condition: str | None = None,
               grid_size: float | None = None, score_threshold: float | None = None,
               iou_threshold: float | None = None, format: str | None = None, up: str | None = None,
               invalid: str | None = None) -> Detections:
        """Oriented 3D boxes (needs a model with a detection head and the in-process worker)."""
        response = self._post("/v1/detect", source, JSON, format, model=model, condition=condition,
                              grid_size=grid_size, score_threshold=score_threshold, iou_threshold=iou_threshold,
                              up=up, invalid=invalid)
        doc = response.json()
        found = doc["detections"]
        boxes = np.array([[*d["center"], *d["size"], d["yaw"]] for d in found], dtype=np.float64).reshape(-1, 7)
        return Detections(boxes=boxes, scores=np.array([d["score"] for d in found], dtype=np.float64),
                          labels=np.array([d["label_id"] for d in found], dtype=np.int64),
                          class_names=tuple(doc["class_names"]), document=doc)

    def render(self, source: Source, cameras: Cameras, *, model: str | None = None, condition: str | None = None,
               width: int | None = None, height: int | None = None, format: str | None = None,
               up: str | None = None) -> list[RenderedImage]:
        """Colour and depth of the scene from each camera (needs a model with a render head and the in-process
        worker). Cameras are in the scene's frame (metres, OpenCV axes; see ``model.render.cameras``), also
        when ``up`` names the scene's up axis (y, -y, x, ..., auto)."""
        body, query = encode_source(source, format)
        name = query.pop("filename", None) or "upload"  # no suffix: ?format= or the magic bytes tell it
        query.update({k: str(v) for k, v in (("model", model), ("condition", condition), ("width", width),
                                              ("height", height), ("up", up)) if v is not None})
        response = self._request("POST", "/v1/render", params=query, headers={"Accept": ZIP},
                                 files={"file": (name, body, "application/octet-stream")},
                                 data={"cameras": cameras_json(cameras)})
        return read_views(response.content)

    def rgbd(self, depth: Mapping[str, Image] | Sequence[Image], cameras: Cameras, *,
             color: Mapping[str, Image] | Sequence[Image] | None = None, task: str = "features",
             model: str | None = None, condition: str | None = None, grid_size: float | None = None,
             dtype: str = "float32", logits: bool = False) -> np.ndarray | Segmentation:
        """Multi-view RGB-D, fused server-side into one cloud, then ``task`` "features" ((N, C) per fused point)
        or "segment" (labels per fused point). ``depth``: 16-bit PNGs in millimetres (or the depth scale named in
        the cameras JSON) per view id (a list is ids 0, 1, ...); ``color``: the same ids; ``cameras``: JSON
        text, a camera file, dicts or Camera objects with ``K`` and a pose per view (OpenCV axes)."""
        if task not in ("features", "segment"):
            raise ValueError(f"task must be 'features' or 'segment', not {task!r}")
        depth_views, color_views = _views(depth), _views(color or {})
        if not depth_views:
            raise ValueError("no depth images given")
        unknown = sorted(set(color_views) - set(depth_views))
        if unknown:
            raise ValueError(f"colour images for views without depth: {', '.join(unknown)}")
        files: list[tuple[str, tuple[str, bytes, str]]] = []
        for prefix, views in (("depth", depth_views), ("color", color_views)):
            for view, image in views.items():
                files.append((f"{prefix}_{view}", (f"{prefix}_{view}.png",
                                                   image_bytes(image, f"{prefix}_{view}"), "image/png")))
        files.append(("cameras", ("cameras.json", rgbd_cameras_json(cameras).encode(), JSON)))
        params = {k: str(v) for k, v in (("model", model), ("condition", condition), ("grid_size", grid_size))
                  if v is not None}
        if task == "features":
            params.update(dtype=dtype, output="per_point")
            response = self._request("POST", "/v1/features", params=params, files=files, headers={"Accept": NPY})
            return load_npy(response.content)
        params["logits"] = str(logits).lower()
        response = self._request("POST", "/v1/segment", params=params, files=files, headers={"Accept": NPZ})
        arrays = load_npz(response.content)
        return Segmentation(labels=arrays["labels"], class_names=tuple(str(n) for n in arrays["class_names"]),
                            logits=arrays.get("logits"))

    def models(self) -> list[dict]:
        return self._request("GET", "/v1/models").json()["models"]

    def health(self) -> dict:
        """The readiness answer ({ready, detail, models, ...}); raises PonderError when not ready."""
        return self._request("GET", "/readyz").json()

"""Python client of the gateway (httpx). Results travel as NPY/NPZ, never JSON, so large clouds stay cheap.

    with PonderClient("http://127.0.0.1:8000", api_key=None) as client:
        feats = client.features("scene.ply")             # (N, C) float32, input order
        seg = client.segment("scene.las", condition="ScanNet")
        seg.labels, seg.class_names
"""

from __future__ import annotations

import io
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from model.pointcloud.cloud import PointCloud

NPY, NPZ = "application/x-npy", "application/x-npz"
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


Source = str | os.PathLike | bytes | PointCloud


def encode_source(source: Source, format: str | None = None) -> tuple[bytes, dict[str, str]]:
    """Request body and query parameters for a path, raw file bytes or an in-memory PointCloud."""
    params: dict[str, str] = {}
    if isinstance(source, PointCloud):
        buffer = io.BytesIO()
        arrays = {"coord": source.coord}
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


def retry_delay(response: httpx.Response | None, attempt: int, backoff_s: float) -> float:
    """Server's Retry-After when given, else exponential backoff."""
    if response is not None:
        after = response.headers.get("retry-after", "")
        if after.isdigit():
            return float(after)
    return backoff_s * 2 ** attempt


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
        for attempt in range(self.retries + 1):
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.TransportError:
                if attempt == self.retries:
                    raise
                time.sleep(retry_delay(None, attempt, self.backoff_s))
                continue
            if response.status_code in RETRY_STATUSES and attempt < self.retries:
                time.sleep(retry_delay(response, attempt, self.backoff_s))
                continue
            raise_for_problem(response)
            return response
        raise AssertionError("unreachable")

    def _post(self, route: str, source: Source, accept: str, format: str | None, **params: Any) -> httpx.Response:
        body, query = encode_source(source, format)
        query.update({k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in params.items()
                      if v is not None})
        return self._request("POST", route, content=body, params=query,
                             headers={"Accept": accept, "Content-Type": "application/octet-stream"})

    def features(self, source: Source, *, model: str | None = None, condition: str | None = None,
                 grid_size: float | None = None, dtype: str = "float32", format: str | None = None) -> np.ndarray:
        """(N, C) features of every input point, in input order."""
        response = self._post("/v1/features", source, NPY, format, model=model, condition=condition,
                              grid_size=grid_size, dtype=dtype, output="per_point")
        return load_npy(response.content)

    def voxel_features(self, source: Source, *, model: str | None = None, condition: str | None = None,
                       grid_size: float | None = None, dtype: str = "float32",
                       format: str | None = None) -> VoxelFeatures:
        response = self._post("/v1/features", source, NPZ, format, model=model, condition=condition,
                              grid_size=grid_size, dtype=dtype, output="per_voxel")
        arrays = load_npz(response.content)
        return VoxelFeatures(arrays["features"], arrays["point_to_voxel"], arrays["grid_coord"])

    def segment(self, source: Source, *, model: str | None = None, condition: str | None = None,
                grid_size: float | None = None, logits: bool = False, format: str | None = None) -> Segmentation:
        response = self._post("/v1/segment", source, NPZ, format, model=model, condition=condition,
                              grid_size=grid_size, logits=logits)
        arrays = load_npz(response.content)
        return Segmentation(labels=arrays["labels"], class_names=tuple(str(n) for n in arrays["class_names"]),
                            logits=arrays.get("logits"))

    def models(self) -> list[dict]:
        return self._request("GET", "/v1/models").json()["models"]

    def health(self) -> dict:
        """The readiness answer ({ready, detail, models, ...}); raises PonderError when not ready."""
        return self._request("GET", "/readyz").json()

"""OpenAPI descriptions shared by the model routes (the bodies are read by hand, so they are declared here),
and the checks shared by the model-job routes (detect, render)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from model.pointcloud.readers import SUPPORTED_FORMATS
from service.encoding import OutputFormat
from service.errors import PROBLEM_JSON, ApiError
from service.schemas import Problem

if TYPE_CHECKING:
    from service.pipeline import Pipeline
    from service.workers.base import ModelCard

_BINARY = {"schema": {"type": "string", "format": "binary"}}

UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "description": "A point-cloud file as the raw body (format from ?format=, the Content-Type "
                       "application/vnd.ponder.<format>, the file name or its magic bytes), or multipart with a "
                       "'file' part, or multipart RGB-D views: depth_<id> (16-bit PNG), optional color_<id> "
                       "(PNG/JPEG) and a 'cameras' JSON part.",
        "content": {
            "application/octet-stream": _BINARY,
            **{f"application/vnd.ponder.{fmt}": _BINARY for fmt in SUPPORTED_FORMATS},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "cameras": {"type": "string", "description": "JSON: per view K or fx/fy/cx/cy and "
                                                                      "world_to_camera or camera_to_world"},
                        "depth_0": {"type": "string", "format": "binary"},
                        "color_0": {"type": "string", "format": "binary"},
                    },
                }
            },
        },
    }
}

_PROBLEM = {"content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}}}
ERRORS = {
    status: {"description": text, "model": Problem, **_PROBLEM}
    for status, text in {
        400: "malformed request (empty body, bad multipart)",
        401: "missing API key",
        403: "wrong API key",
        404: "unknown model",
        406: "the answer cannot be given in the accepted format (e.g. too large for JSON)",
        413: "upload or point count over the limit",
        415: "unknown or unrecognisable point-cloud format",
        422: "invalid parameters or unusable input (NaN coordinates, unknown condition, corrupt file)",
        429: "rate limit exceeded (see Retry-After)",
        502: "the Triton model server answered with an error of its own",
        503: "queue full or model server unavailable (see Retry-After)",
        504: "the request did not finish in time",
    }.items()
}


def answers(json_model: type) -> dict:
    """OpenAPI responses of a model route: the JSON model, the binary formats, and every error."""
    ok = {"description": "the result, in the format chosen by the Accept header", "model": json_model,
          "content": {OutputFormat.NPY.value: _BINARY, OutputFormat.NPZ.value: _BINARY,
                      OutputFormat.ARROW.value: _BINARY}}
    return {200: ok, **ERRORS}


NOT_IMPLEMENTED = {501: {"description": "the route needs the in-process worker (the Triton worker serves only "
                                        "features and segmentation)", "model": Problem, **_PROBLEM}}


def job_card(pipeline: Pipeline, model: str | None, capability: str) -> ModelCard:
    """The model a detect/render request names, after checking that the worker runs model jobs (501) and
    that the model has ``capability`` (422 naming the model and what it can do)."""
    if not pipeline.worker.runs_model_jobs:
        raise ApiError(501, f"/v1/{capability} is not available with the {pipeline.worker.kind} worker: detection "
                            "and rendering need the in-process worker (PONDER_WORKER=inprocess)")
    card = pipeline.card(model)
    if model is None and capability not in card.capabilities:
        # no model named: the first served model that can do it (e.g. the bundled default's detect/render parts)
        capable = [c for c in pipeline.worker.models().values() if capability in c.capabilities]
        card = capable[0] if capable else card
    need = {"detect": "a detection head (train one with `ponder train detect`)",
            "render": "a render head (a pre-training checkpoint)"}[capability]
    if capability not in card.capabilities and model is None:
        served = ", ".join(f"{name} ({', '.join(c.capabilities)})" for name, c in pipeline.worker.models().items())
        raise ApiError(422, f"no served model can {capability}: that needs {need}; served: {served}")
    if capability not in card.capabilities:
        raise ApiError(422, f"model {card.info.name!r} ({card.info.kind}) cannot {capability}: that needs "
                            f"{need}; it can do: {', '.join(card.capabilities)}")
    return card

"""What a Triton endpoint serves, as the gateway compares it: model cards from ensemble metadata, the
`Served` entry per model (card, input channels, classes, weights digest), the short line saying how two entries
differ, and the checks of a failure (protocol hints) and of an answer's shape against its card.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any, NamedTuple

import numpy as np

from model.conditions import default_condition
from model.results import ModelInfo
from service.workers.base import EncodeJob, ModelCard


def card_from_metadata(name: str, meta: dict) -> ModelCard:
    """A model card from the ponder metadata of an ensemble config (`export.triton_repo.config_metadata`)."""
    conditions = tuple(meta.get("conditions") or ())
    info = ModelInfo(name=name, kind=str(meta["kind"]), conditions=conditions,
                     class_names={k: tuple(v) for k, v in (meta.get("class_names") or {}).items()},
                     feature_dim=int(meta["out_channels"]), grid_size=float(meta["grid_size"]),
                     input_features=tuple(meta.get("input_features") or ("color", "normal")),
                     version=str(meta.get("version", "1")))
    return ModelCard(info=info, has_classifier="seg_logits" in (meta.get("outputs") or ()),
                     default_condition=default_condition(conditions))


class Served(NamedTuple):
    """What an endpoint serves under one model name: the card and what the answer check needs."""

    card: ModelCard
    in_channels: int
    num_classes: dict  # condition (or "default") -> logits width
    weights: str = ""  # ponder.weights_sha256 of the export ("" before digests): same shapes, other weights differ


def served_from_metadata(name: str, meta: dict) -> Served:
    """The Served entry of an ensemble's ponder metadata; everything in it takes part in the endpoint check."""
    classes = meta.get("num_classes") if isinstance(meta.get("num_classes"), dict) else {}
    return Served(card_from_metadata(name, meta), int(meta["in_channels"]),
                  {str(k): int(v) for k, v in classes.items()}, str(meta.get("weights_sha256", "")))


def _brief(value: Any, limit: int = 60) -> str:
    text = str(list(value) if isinstance(value, tuple) else value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def card_differences(got: Served, served: Served) -> str:
    """What an endpoint's entry changes against the expected one, short (``feature_dim 24, expected 32``), so
    an operator sees at a glance which worker runs another model."""
    pairs = [(f.name, getattr(got.card.info, f.name), getattr(served.card.info, f.name))
             for f in fields(got.card.info) if f.name != "name"]
    pairs += [("outputs", "seg_logits" if got.card.has_classifier else "features only",
               "seg_logits" if served.card.has_classifier else "features only"),
              ("in_channels", got.in_channels, served.in_channels),
              ("num_classes", got.num_classes, served.num_classes),
              ("weights", got.weights[:12] or "unknown", served.weights[:12] or "unknown")]
    diffs = [f"{key} {_brief(mine)}, expected {_brief(theirs)}" for key, mine, theirs in pairs if mine != theirs]
    return ", ".join(diffs) or "its model card differs"


def one_line(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split())
    if not text:
        return type(exc).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def describe_failure(url: str, protocol: str, exc: BaseException) -> str:
    """One short line for an endpoint's failure, with a hint when the port is probably the other protocol's
    (a gRPC client on the HTTP port reads "Socket closed", an HTTP client on the gRPC port HTTP/2 bytes)."""
    text = one_line(exc)
    lower = text.lower()
    if protocol == "grpc" and "socket closed" in lower:
        return (f"{text} (is {url} Triton's gRPC port? PONDER_TRITON_PROTOCOL=grpc expects the gRPC "
                f"port, `ponder worker --grpc-port`, default 8101)")
    if protocol == "http" and ("bad status line" in lower or "\\x00\\x00" in text
                                        or "invalid http" in lower):
        return (f"the answer is not HTTP/1.1 ({text[:48]}...; is {url} Triton's HTTP port? PONDER_TRITON_PROTOCOL=http expects "
                f"the HTTP port, `ponder worker --http-port`, default 8100)")
    return text


def answer_problem(job: EncodeJob, served: Served, features: Any, logits: Any, want_logits: bool) -> str | None:
    """Why an answer does not fit the card it was asked under (rows = voxels, width = the card's), or None."""
    rows, width = len(job.voxels.grid_coord), served.card.info.feature_dim
    if not isinstance(features, np.ndarray) or features.shape != (rows, width):
        shape = getattr(features, "shape", None)
        return f"backbone_feat of shape {shape} for model {job.model!r}, whose card says ({rows}, {width})"
    if want_logits:
        condition = served.card.resolve_condition(job.condition)
        classes = served.num_classes.get(condition if condition is not None else "default")
        shape = getattr(logits, "shape", None)
        if not isinstance(logits, np.ndarray) or logits.ndim != 2 or logits.shape[0] != rows or \
                (classes is not None and logits.shape[1] != classes):
            return f"seg_logits of shape {shape} for model {job.model!r}, whose card says ({rows}, {classes})"
    return None

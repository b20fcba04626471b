"""The worker interface: the gateway hands a worker voxelised scenes and gets per-voxel features (and
logits when asked). Decoding and voxelising stay in the gateway, so every worker sees the same tensors.

Detection and rendering need the whole model (head, render volume), not just features, so they travel as a
:class:`ModelJob`: a function of the loaded Predictor that a worker holding the models runs on its model
thread (the in-process worker); other workers refuse it with :class:`WorkerUnsupported`.

Admission: a request reserves its place with ``Worker.admit(lane)`` (a :class:`Ticket`) before its upload is
read or decoded, so an overloaded worker refuses with 503 at once; the ticket is released when the request
ends (answered, failed, timed out or disconnected). Jobs carry a ``model.cancel.CancelToken`` with the
request's deadline: the worker skips a job whose token is cancelled and long model work checks it per chunk."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from model.cancel import CancelToken
from model.conditions import resolve_condition
from model.pointcloud.voxelize import VoxelizedCloud

if TYPE_CHECKING:  # torch-free at import: a gateway in front of Triton has no torch
    from model.inference import ModelInfo, Predictor


@dataclass(frozen=True)
class ModelCard:
    """What the gateway knows of a served model without holding it: its info (``name`` is the name it is
    served under), whether it can segment, detect and render, and the condition used when a request names none."""

    info: ModelInfo
    has_classifier: bool
    default_condition: str | None
    has_detector: bool = False
    can_render: bool = False

    @classmethod
    def of(cls, name: str, predictor: Predictor) -> "ModelCard":
        return cls(info=replace(predictor.info, name=name), has_classifier=predictor.has_classifier,
                   default_condition=predictor.resolve_condition(None), has_detector=_has_detector(predictor),
                   can_render=_can_render(predictor))

    @property
    def capabilities(self) -> tuple[str, ...]:
        """What the model can answer: features always; segment, detect, render when it has the head."""
        flags = {"segment": self.has_classifier, "detect": self.has_detector, "render": self.can_render}
        return ("features", *(name for name, flag in flags.items() if flag))

    def to_dict(self) -> dict:
        return {"info": asdict(self.info), "has_classifier": self.has_classifier,
                "default_condition": self.default_condition, "has_detector": self.has_detector,
                "can_render": self.can_render}

    @classmethod
    def from_dict(cls, data: dict) -> "ModelCard":
        from model.results import ModelInfo

        info = dict(data["info"])
        info["conditions"] = tuple(info["conditions"])
        info["class_names"] = {k: tuple(v) for k, v in info["class_names"].items()}
        info["input_features"] = tuple(info["input_features"])
        return cls(info=ModelInfo(**info), has_classifier=bool(data["has_classifier"]),
                   default_condition=data.get("default_condition"),
                   has_detector=bool(data.get("has_detector", False)), can_render=bool(data.get("can_render", False)))

    def resolve_condition(self, condition: str | None) -> str | None:
        """The condition a request runs under (ValueError naming the valid ones), checked in the gateway
        so a bad one is refused before it takes a queue slot; the rule of `model.conditions`."""
        return resolve_condition(self.info.conditions, condition, default=self.default_condition,
                                 model=self.info.name)

    def class_names(self, condition: str | None, num_classes: int) -> tuple[str, ...]:
        """Label names for a resolved condition; generic names when the model's list does not fit."""
        names = self.info.class_names.get(condition if condition is not None else "default", ())
        return tuple(names) if len(names) == num_classes else tuple(f"class{i}" for i in range(num_classes))


def _has_detector(predictor: Predictor) -> bool:
    from model.detection.head import DetectionHead

    return isinstance(getattr(predictor.model, "detector", None), DetectionHead)


def _can_render(predictor: Predictor) -> bool:
    from model.novel_view import check_renderable

    try:
        check_renderable(predictor.config, predictor.model)
    except ValueError:
        return False
    return True


SHUTTING_DOWN = "the server is shutting down"  # cancel reason at shutdown; the pipeline answers it with 503


class WorkerBusy(Exception):
    """The worker's queue is full; the client should retry after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


class WorkerUnavailable(Exception):
    """No model server could be reached (after retries, or every circuit breaker is open)."""


class WorkerFailed(Exception):
    """The model server answered with an error of its own (not the input's fault, not transient)."""


class WorkerInputError(ValueError):
    """The worker refused the input itself (e.g. Triton INVALID_ARG); not worth a retry."""


class WorkerUnsupported(Exception):
    """This kind of worker cannot run the request at all (e.g. a ModelJob on the Triton worker)."""


FAST, LONG = "fast", "long"  # lanes: batched encoder passes; long model jobs (render, precise segment, detect)


class Ticket:
    """A place reserved in a lane from admission to the end of the request; ``release`` is idempotent."""

    def __init__(self, on_release: Callable[[], None] | None = None) -> None:
        self._on_release = on_release

    def release(self) -> None:
        callback, self._on_release = self._on_release, None
        if callback is not None:
            callback()

    @property
    def held(self) -> bool:
        return self._on_release is not None


@dataclass
class EncodeJob:
    """One scene for one model. ``condition`` was validated against the model's conditions. ``cancel``: the
    request's deadline/cancel flag; ``ticket``: its admission (None = the worker admits it when submitted)."""

    model: str
    voxels: VoxelizedCloud
    condition: str | None = None
    want_logits: bool = False
    cancel: CancelToken | None = None
    ticket: Ticket | None = None


@dataclass
class ModelJob:
    """Work on one served model other than the batched encoder pass (detection, rendering): ``fn`` receives
    the model's Predictor and runs on the model thread, alone, in queue order. ``name`` labels logs."""

    model: str
    fn: Callable[[Predictor], Any]
    name: str = "job"
    cancel: CancelToken | None = None  # made active (model.cancel.active) while fn runs; checked per chunk
    ticket: Ticket | None = None


@dataclass
class EncodeOutput:
    features: np.ndarray  # (M, C) float32 per-voxel features
    logits: np.ndarray | None = None  # (M, K) float32 per-voxel logits when asked for


class Worker(ABC):
    """A source of model outputs. ``start`` loads or connects; ``models`` is valid after it."""

    kind: str = "worker"
    runs_model_jobs: bool = False  # whether ``call`` works (the worker holds the models themselves)

    @abstractmethod
    async def start(self) -> None: ...

    @abstractmethod
    async def stop(self) -> None: ...

    @abstractmethod
    def models(self) -> dict[str, ModelCard]:
        """Served models by name, in the order they were configured."""

    @abstractmethod
    async def ready(self) -> tuple[bool, str]:
        """(ready, reason): models loaded and a model server reachable."""

    @abstractmethod
    async def run(self, job: EncodeJob) -> EncodeOutput:
        """Encode one scene; raises WorkerBusy, WorkerUnavailable, WorkerFailed or WorkerInputError."""

    async def call(self, job: ModelJob) -> Any:
        """Run ``job.fn(predictor)`` on the model; raises WorkerUnsupported unless ``runs_model_jobs``."""
        raise WorkerUnsupported(f"the {self.kind} worker serves only features and segmentation; detection and "
                                "rendering need the in-process worker (PONDER_WORKER=inprocess)")

    def admit(self, lane: str = FAST) -> Ticket:
        """Reserve a place for one request in ``lane`` (raises WorkerBusy when it is full). This worker
        bounds its work elsewhere, so its tickets hold nothing."""
        return Ticket()

    def check_admission(self, lane: str = FAST) -> None:
        """Raise WorkerBusy when ``admit(lane)`` would now, reserving nothing: a request is refused before its
        upload is read but takes its place only once the upload is in (``service.pipeline.Admission``)."""

    def cancel_all(self, reason: str) -> int:
        """Cancel every queued and running job (shutdown); returns how many. Nothing to cancel here."""
        return 0

    def queue_depth(self) -> int:
        return 0

"""``ponder worker --triton``: the Predictor served inside a real Triton Inference Server (nvidia-pytriton).

Per served model, a Triton model of the same name takes the gateway's tensors
    grid_coord (M, 3) INT32, feat (M, C) FP32, condition (1,) BYTES ("" = the model's default)
and answers features (M, C) FP32, plus logits (M, K) FP32 when the model has a classifier and the
client asks for that output. Batching is off (scenes are ragged); the requests Triton hands over
together are still merged into one ``Predictor.encode`` call per condition. A tiny extra model,
``ponder_models``, answers the JSON model cards so a gateway knows what it serves without a checkpoint.
"""

from __future__ import annotations

import json
import logging
import signal
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import numpy as np

from export.triton_serve import fix_libpython_path  # the one implementation of the libpython fix
from model.inference import Predictor
from model.pointcloud.voxelize import VoxelizedCloud
from service.workers.base import ModelCard
from service.workers.loading import discover_checkpoints, load_predictors

LOG = logging.getLogger("service.triton")
INFO_MODEL = "ponder_models"


def _decode_condition(value: np.ndarray) -> str | None:
    raw = value.reshape(-1)[0] if value.size else b""
    text = raw.decode() if isinstance(raw, (bytes, np.bytes_)) else str(raw)
    return text or None


def _network_input(grid: np.ndarray, feat: np.ndarray) -> VoxelizedCloud:
    """The point-level fields stay with the gateway; the worker only needs what the network reads."""
    return VoxelizedCloud.from_network_input(grid, feat)


def make_infer_fn(predictor: Predictor) -> Callable[[list], list[dict[str, np.ndarray]]]:
    """The pytriton callable for one model: requests grouped by condition, one encode per group."""

    def infer(requests: list) -> list[dict[str, np.ndarray]]:
        groups: dict[str | None, list[int]] = defaultdict(list)
        scenes: list[VoxelizedCloud] = []
        for i, request in enumerate(requests):
            grid, feat = request["grid_coord"], request["feat"]  # (M, 3) int32, (M, C) float32
            if grid.ndim != 2 or grid.shape[1] != 3 or feat.ndim != 2 or len(feat) != len(grid):
                raise ValueError(f"grid_coord must be (M, 3) and feat (M, C) with the same M; got {grid.shape} "
                                 f"and {feat.shape}")
            scenes.append(_network_input(grid, feat))
            groups[_decode_condition(request["condition"])].append(i)
        answers: list[dict[str, np.ndarray]] = [{} for _ in requests]
        for condition, members in groups.items():
            features = predictor.encode([scenes[i] for i in members], condition=condition)
            for i, f in zip(members, features):
                answers[i]["features"] = f
            wanted = [i for i in members if predictor.has_classifier and _wants(requests[i], "logits")]
            if wanted:
                logits = predictor.classify([answers[i]["features"] for i in wanted], condition=condition)
                for i, lg in zip(wanted, logits):
                    answers[i]["logits"] = lg
        return answers

    return infer


def _wants(request: Any, output: str) -> bool:
    names = getattr(request, "requested_output_names", None)
    return not names or output in names


def make_info_fn(cards: dict[str, ModelCard]) -> Callable[[list], list[dict[str, np.ndarray]]]:
    payload = json.dumps({name: card.to_dict() for name, card in cards.items()}).encode()

    def info(requests: list) -> list[dict[str, np.ndarray]]:
        return [{"cards": np.array([payload], dtype=np.object_)} for _ in requests]

    return info


def serve_triton(checkpoint: Path | None, models_dir: Path | None, device: str = "cpu",
                 trust_checkpoint: bool = False, grpc_port: int = 8001, http_port: int = 8000,
                 metrics_port: int = 8002, host: str = "127.0.0.1") -> None:
    """Load the models and serve them until interrupted (Ctrl-C, or SIGTERM: the server is stopped cleanly,
    so no tritonserver process or shared-memory segment is left behind)."""
    fix_libpython_path()
    from pytriton.model_config import ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    predictors = load_predictors(discover_checkpoints(checkpoint, models_dir), device, trust_checkpoint)
    cards = {name: ModelCard.of(name, p) for name, p in predictors.items()}
    config = TritonConfig(grpc_address=host, grpc_port=grpc_port, http_address=host, http_port=http_port,
                          metrics_port=metrics_port, exit_timeout_secs=5)
    with Triton(config=config) as triton:
        for name, predictor in predictors.items():
            outputs = [Tensor(name="features", dtype=np.float32, shape=(-1, -1))]
            if predictor.has_classifier:
                outputs.append(Tensor(name="logits", dtype=np.float32, shape=(-1, -1)))
            triton.bind(model_name=name, infer_func=make_infer_fn(predictor),
                        inputs=[Tensor(name="grid_coord", dtype=np.int32, shape=(-1, 3)),
                                Tensor(name="feat", dtype=np.float32, shape=(-1, -1)),
                                Tensor(name="condition", dtype=bytes, shape=(1,))],
                        outputs=outputs, config=ModelConfig(batching=False), strict=False)
        triton.bind(model_name=INFO_MODEL, infer_func=make_info_fn(cards),
                    inputs=[Tensor(name="query", dtype=bytes, shape=(1,))],
                    outputs=[Tensor(name="cards", dtype=bytes, shape=(1,))], config=ModelConfig(batching=False))
        LOG.info("Triton serving %s on gRPC %s:%d, HTTP %s:%d", ", ".join(cards), host, grpc_port, host, http_port)
        previous = signal.signal(signal.SIGTERM, _interrupt)
        try:
            triton.serve()
        finally:
            signal.signal(signal.SIGTERM, previous)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt

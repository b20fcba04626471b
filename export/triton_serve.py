"""Serve and query an exported model through a real Triton Inference Server.

Server side: the tritonserver that nvidia-pytriton ships has only the Python backend (no
``backends/onnxruntime``), so a repository's ``model.onnx`` cannot be loaded by Triton's own
onnxruntime backend there. `bind_onnx_model` serves it through pytriton instead: the same
``config.pbtxt`` (inputs, outputs, shapes, no batching) is bound to a callable that runs the model in
an onnxruntime session. A full Triton image (NGC ``tritonserver``) loads the repository directly.

Client side: `TritonRunner` builds the kernel maps (`model.sparse.kernel_maps`) and queries any
Triton serving the model — both paths above take the same request.
"""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path
from typing import Any

import numpy as np
from tritonclient.grpc import model_config_pb2 as pb

from export.onnx_export import read_info
from export.onnxrt import OnnxRunner, make_inputs
from export.triton_repo import read_model_config

NUMPY_TYPES = {pb.TYPE_FP32: np.float32, pb.TYPE_INT64: np.int64, pb.TYPE_INT32: np.int32}
TRITON_TYPES = {np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64", np.dtype(np.int32): "INT32"}


def fix_libpython_path() -> None:
    """The Python-backend stub must load this interpreter's libpython: prepend its LIBDIR to
    LD_LIBRARY_PATH before the server starts (it inherits the environment)."""
    libdir = sysconfig.get_config_var("LIBDIR")
    current = os.environ.get("LD_LIBRARY_PATH", "")
    if libdir and libdir not in current.split(":"):
        os.environ["LD_LIBRARY_PATH"] = f"{libdir}:{current}" if current else libdir


def bind_onnx_model(triton: Any, model_dir: str | Path, threads: int | None = None) -> OnnxRunner:
    """Bind ``<model_dir>/1/model.onnx`` to a started-or-starting ``pytriton.triton.Triton`` under the
    name, inputs and outputs of ``<model_dir>/config.pbtxt``. Returns the runner behind it."""
    from pytriton.model_config import ModelConfig, Tensor

    model_dir = Path(model_dir)
    config = read_model_config(model_dir)
    if config.backend != "onnxruntime":
        raise ValueError(f"{model_dir}: backend {config.backend!r}; only onnxruntime models can be served this way")
    on_cpu = all(g.kind == pb.ModelInstanceGroup.KIND_CPU for g in config.instance_group)
    runner = OnnxRunner(model_dir / "1" / "model.onnx", device="cpu" if on_cpu else "auto", threads=threads)
    names = [i.name for i in config.input]

    def infer(requests: list) -> list[dict[str, np.ndarray]]:
        return [runner.run_feeds({n: np.asarray(request[n]) for n in names}) for request in requests]

    def tensors(values) -> list:
        return [Tensor(name=v.name, dtype=NUMPY_TYPES[v.data_type], shape=tuple(v.dims)) for v in values]

    triton.bind(model_name=config.name, infer_func=infer, inputs=tensors(config.input),
                outputs=tensors(config.output), config=ModelConfig(batching=False), strict=True)
    return runner


class TritonRunner:
    """Query a Triton-served GatherSpUNet: the host computes kernel maps, Triton runs the graph."""

    def __init__(self, url: str, model_name: str, onnx_path: str | Path, protocol: str = "http",
                 timeout_s: float = 60.0):
        self.info = read_info(onnx_path)
        self.model_name = model_name
        self.protocol = protocol
        if protocol == "http":
            import tritonclient.http as client

            self.client = client.InferenceServerClient(url, connection_timeout=timeout_s, network_timeout=timeout_s)
        elif protocol == "grpc":
            import tritonclient.grpc as client

            self.client = client.InferenceServerClient(url)
        else:
            raise ValueError(f"protocol must be 'http' or 'grpc', got {protocol!r}")
        self._module = client

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> "TritonRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def run_feeds(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        inputs = []
        for name, value in feeds.items():
            value = np.ascontiguousarray(value)
            tensor = self._module.InferInput(name, list(value.shape), TRITON_TYPES[value.dtype])
            tensor.set_data_from_numpy(value)
            inputs.append(tensor)
        outputs = [self._module.InferRequestedOutput(n) for n in self.info.outputs]
        result = self.client.infer(self.model_name, inputs, outputs=outputs)
        return {n: result.as_numpy(n) for n in self.info.outputs}

    def run(self, feat: np.ndarray, grid_coord: np.ndarray, batch: np.ndarray | None = None,
            condition: int | str | None = None) -> dict[str, np.ndarray]:
        return self.run_feeds(make_inputs(self.info, feat, grid_coord, batch, condition))

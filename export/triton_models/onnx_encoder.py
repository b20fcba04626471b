"""Step 2 of the ponder ensemble for ``--kind python-onnxruntime``: the exported ONNX graph (``model.onnx``
beside this file) in onnxruntime, inside a Triton Python-backend model. Same tensors as the onnxruntime
backend's model, for Triton builds that ship only the Python backend (the one inside nvidia-pytriton).

GPU instances use onnxruntime's CUDA provider when this onnxruntime has it; ``ponder.threads`` sets the
intra-op threads (0 = onnxruntime's default). A request whose caller's deadline has passed while it waited
is skipped (CANCELLED; see export.scene_request). Needs the ponder package importable by the stub's Python
(``ponder worker --triton`` arranges that), for its onnxruntime settings.
"""

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

from export.ort_session import release_arena_after_run, session_options
from export.scene_request import checked


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.name = args["model_name"]
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        threads = int(params.get("ponder.threads", "0"))
        providers = ["CPUExecutionProvider"]
        if args.get("model_instance_kind") == "GPU" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": int(args["model_instance_device_id"])}))
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        # the same settings as in-process (export/ort_session.py): nodes in the graph's order (~5x less peak
        # memory than onnxruntime's default order), the CPU arena's free memory given back after each request
        self.session = ort.InferenceSession(path, session_options(threads), providers=providers)
        self.run_options = release_arena_after_run()
        self.inputs = [i["name"] for i in config["input"]]
        self.outputs = [o["name"] for o in config["output"]]

    def execute(self, requests):
        responses = []
        for request in requests:  # a scene whose caller's deadline passed while it waited here is skipped
            feeds, refused = checked(request, self.name, pb_utils, self._feeds)
            if refused is not None:
                responses.append(refused)
                continue
            try:
                values = self.session.run(self.outputs, feeds, self.run_options)
            except Exception as exc:  # noqa: BLE001 - step 1 checked the input, so this is the server's fault
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"onnxruntime: {exc}")))
                continue
            tensors = [pb_utils.Tensor(n, np.ascontiguousarray(v)) for n, v in zip(self.outputs, values)]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses

    def _feeds(self, request):
        return {n: pb_utils.get_input_tensor_by_name(request, n).as_numpy() for n in self.inputs}

"""Step 2 of the ponder ensemble for ``--kind python-torch``: the checkpoint in ``checkpoint/`` beside this file,
run by ponder's torch engine inside a Triton Python-backend model. Same tensors as the ONNX encoder's step (the
tables of step 1 in, ``backbone_feat`` [+ ``seg_logits``] out), computed as the in-process worker computes them:
valid pairs on CPU instances (3-4x faster than the exported gather graph in onnxruntime there), the gather
formulation on GPU instances. ``ponder.threads`` sets torch's intra-op threads (0 = torch's default).

Needs the ponder package importable by the stub's Python (``ponder worker --triton`` arranges that).
"""

import json
import os

import numpy as np
import torch
import triton_python_backend_utils as pb_utils
from torch.utils.dlpack import from_dlpack, to_dlpack

from model.checkpoint import load_checkpoint
from model.engine.encoder import engine_formulation
from model.engine.memory import reuse_freed_memory
from model.engine.unet import SpUNetEngine


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        threads = int(params.get("ponder.threads", "0"))
        if threads > 0:
            torch.set_num_threads(threads)
        reuse_freed_memory()  # as every ponder command: freed buffers stay in the heap for the next request
        gpu = args.get("model_instance_kind") == "GPU"
        self.device = torch.device(f"cuda:{args['model_instance_device_id']}" if gpu else "cpu")
        self.inputs = [i["name"] for i in config["input"]]
        self.outputs = [o["name"] for o in config["output"]]
        folder = os.path.join(args["model_repository"], args["model_version"], "checkpoint")
        engine = SpUNetEngine.from_loaded(load_checkpoint(folder), heads="seg_logits" in self.outputs,
                                          formulation=engine_formulation(self.device))
        if list(engine.outputs) != self.outputs:
            raise ValueError(f"the checkpoint in {folder} gives {list(engine.outputs)}, the config promises "
                             f"{self.outputs}: export the repository again")
        self.engine = engine.to(self.device).eval()

    def execute(self, requests):
        responses = []
        for request in requests:
            tensors = [self._input(request, name) for name in self.inputs]
            try:
                with torch.no_grad():
                    values = self.engine(*tensors)
            except Exception as exc:  # noqa: BLE001 - step 1 checked the input, so this is the server's fault
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"torch engine: {exc}")))
                continue
            responses.append(pb_utils.InferenceResponse(
                output_tensors=[self._output(name, value) for name, value in zip(self.outputs, values)]))
        return responses

    def _input(self, request, name):
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        if tensor.is_cpu():
            return torch.from_numpy(tensor.as_numpy()).to(self.device)
        return from_dlpack(tensor.to_dlpack()).to(self.device)

    def _output(self, name, value):
        value = value.contiguous()
        if value.is_cuda:
            return pb_utils.Tensor.from_dlpack(name, to_dlpack(value))
        return pb_utils.Tensor(name, np.ascontiguousarray(value.numpy()))

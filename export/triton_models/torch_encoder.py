"""The one step of the ponder ensemble for ``--kind python-torch``: the checkpoint in ``checkpoint/`` beside this
file, run by ponder's torch engine inside a Triton Python-backend model, exactly as the in-process worker runs
it: the gateway's tensors in (``grid_coord``, ``batch``, ``feat`` [, ``condition``]), kernel maps built here on
the instance's device, then the engine (valid pairs on CPU instances, 3-4x faster than the exported gather graph
in onnxruntime there; the gather formulation on GPU instances); ``backbone_feat`` [+ ``seg_logits``] out.

Building the tables here rather than in a kernel-map step keeps them out of Triton's shared memory: on CPU that
copy into and out of ``/dev/shm`` was ~20 % of a request (0.8 GB of tables at 1M voxels). A bad request is
answered with INVALID_ARG (a client error), as the kernel-map step answers it; one whose caller's deadline
has passed is skipped (CANCELLED). ``ponder.threads`` sets torch's intra-op threads (0 = torch's default).

Needs the ponder package importable by the stub's Python (``ponder worker --triton`` arranges that).
"""

import json
import os

import numpy as np
import torch
import triton_python_backend_utils as pb_utils
from torch.utils.dlpack import to_dlpack

from export.scene_request import check_scene_request, checked
from model.checkpoint import load_checkpoint
from model.engine.encoder import engine_formulation
from model.engine.memory import reuse_freed_memory
from model.engine.unet import SpUNetEngine


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.name = args["model_name"]
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        threads = int(params.get("ponder.threads", "0"))
        if threads > 0:
            torch.set_num_threads(threads)
        reuse_freed_memory()  # as every ponder command: freed buffers stay in the heap for the next request
        gpu = args.get("model_instance_kind") == "GPU"
        self.device = torch.device(f"cuda:{args['model_instance_device_id']}" if gpu else "cpu")
        self.in_channels = int(params["ponder.in_channels"])
        self.num_conditions = int(params["ponder.num_conditions"])
        self.outputs = [o["name"] for o in config["output"]]
        folder = os.path.join(args["model_repository"], args["model_version"], "checkpoint")
        engine = SpUNetEngine.from_loaded(load_checkpoint(folder), heads="seg_logits" in self.outputs,
                                          formulation=engine_formulation(self.device))
        if list(engine.outputs) != self.outputs:
            raise ValueError(f"the checkpoint in {folder} gives {list(engine.outputs)}, the config promises "
                             f"{self.outputs}: export the repository again")
        self.engine = engine.to(self.device).eval()

    def execute(self, requests):
        return [self._answer(request) for request in requests]

    def _answer(self, request):
        inputs, refused = checked(request, self.name, pb_utils, self._inputs)
        if refused is not None:
            return refused
        try:
            with torch.no_grad():
                values = self.engine(*inputs)
        except Exception as exc:  # noqa: BLE001 - the input was checked above, so this is the server's fault
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"torch engine: {exc}"))
        return pb_utils.InferenceResponse(
            output_tensors=[self._output(name, value) for name, value in zip(self.outputs, values)])

    def _inputs(self, request):
        """The engine's arguments: the request's features, the tables built from its voxels, its condition."""
        def array(name):
            return pb_utils.get_input_tensor_by_name(request, name).as_numpy()

        grid, batch, feat = array("grid_coord"), array("batch"), array("feat")
        index = check_scene_request(grid, feat, array("condition") if self.num_conditions else None,
                                    self.in_channels, self.num_conditions)
        maps = self.engine.kernel_maps(torch.from_numpy(grid).to(self.device),
                                       torch.from_numpy(batch).to(self.device))
        inputs = (torch.from_numpy(feat).to(self.device), *maps.tables())
        if index is not None:  # a conditional model (the config and the checkpoint agree: same digest at export)
            inputs += (torch.tensor([index], dtype=torch.int64, device=self.device),)
        return inputs

    def _output(self, name, value):
        value = value.contiguous()
        if value.is_cuda:
            return pb_utils.Tensor.from_dlpack(name, to_dlpack(value))
        return pb_utils.Tensor(name, np.ascontiguousarray(value.numpy()))

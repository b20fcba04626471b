"""Step 1 of the ponder ensemble (Triton Python backend): the kernel-map tables of a request.

Inputs ``grid_coord (M, 3) INT32``, ``batch (M,) INT32``, ``feat (M, C) FP32`` and, for conditional models,
``condition (1,) INT64``. ``feat`` and ``condition`` are only checked here (`export.scene_request`): the
encoder takes them straight from the ensemble. Outputs every table the config lists, in the config's data
type, built by ``model.sparse.kernel_maps.build_kernel_maps`` on the instance's device; GPU instances hand
the tables to the encoder through DLPack without a host copy. A bad request is answered with INVALID_ARG
(a client error); one whose caller's deadline has passed is skipped (CANCELLED).

Needs the ponder package importable by the stub's Python (``ponder worker --triton`` arranges that).
"""

import json

import torch
import triton_python_backend_utils as pb_utils
from torch.utils.dlpack import to_dlpack

from export.scene_request import check_scene_request, checked
from model.sparse.kernel_maps import build_kernel_maps

TORCH_TYPES = {"TYPE_INT32": torch.int32, "TYPE_INT64": torch.int64}


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.name = args["model_name"]
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.num_levels = int(params["ponder.num_levels"])
        self.stem_kernel = int(params["ponder.stem_kernel"])
        self.in_channels = int(params["ponder.in_channels"])
        self.num_conditions = int(params["ponder.num_conditions"])
        self.outputs = [(o["name"], TORCH_TYPES[o["data_type"]]) for o in config["output"]]
        gpu = args.get("model_instance_kind") == "GPU"
        self.device = torch.device(f"cuda:{args['model_instance_device_id']}" if gpu else "cpu")

    def execute(self, requests):
        return [self._answer(request) for request in requests]

    def _answer(self, request):
        tables, refused = checked(request, self.name, pb_utils, self._tables)
        if refused is not None:
            return refused
        out = []
        for name, dtype in self.outputs:
            table = tables[name].to(dtype).contiguous()
            if table.is_cuda:
                out.append(pb_utils.Tensor.from_dlpack(name, to_dlpack(table)))
            else:
                out.append(pb_utils.Tensor(name, table.numpy()))
        return pb_utils.InferenceResponse(output_tensors=out)

    def _tables(self, request):
        grid = pb_utils.get_input_tensor_by_name(request, "grid_coord").as_numpy()
        batch = pb_utils.get_input_tensor_by_name(request, "batch").as_numpy()
        feat = pb_utils.get_input_tensor_by_name(request, "feat").as_numpy()
        condition = pb_utils.get_input_tensor_by_name(request, "condition") if self.num_conditions else None
        check_scene_request(grid, feat, None if condition is None else condition.as_numpy(), self.in_channels,
                            self.num_conditions)
        maps = build_kernel_maps(torch.from_numpy(grid).to(self.device), torch.from_numpy(batch).to(self.device),
                                 num_levels=self.num_levels, stem_kernel=self.stem_kernel)
        return dict(zip(maps.table_names(), maps.tables()))

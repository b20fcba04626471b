"""onnxruntime settings for the exported encoder, shared by the in-process runner (`export.onnxrt`) and the
Triton stub of ``--kind python-onnxruntime`` (`export/triton_models/onnx_encoder.py`). Imports only
onnxruntime, so the stub pulls in nothing else.

Memory (published size, 2 threads, peak RSS above the loaded session, separate processes):

| scene | default order | priority order | time per run (default / priority) |
|---|---|---|---|
| 131k-voxel room | 2.60 GB | 0.48 GB | 8.2-8.7 / 7.6-8.2 s |
| 1M-point cloud, 307k voxels | 5.74 GB | 1.05 GB | 14.5 / 14.3 s |

onnxruntime's default order is a depth-first walk from the outputs that takes a node's latest-made input first:
in a conv, every tap's ``Gemm(gathered_k, W_k, sum_{k-1})`` has its gather made after ``sum_{k-1}``, so all
27 gathered operands are made before the first Gemm runs and live at once. The priority order follows the
graph's node order, which the exporter wrote in execution order (gather, Gemm, next tap): one operand at a time.
"""

from __future__ import annotations

import onnxruntime as ort


def session_options(threads: int | None = None) -> ort.SessionOptions:
    """Nodes in the graph's own order (see the module), ``threads`` intra-op threads (None or 0: onnxruntime's
    default) and one inter-op thread."""
    options = ort.SessionOptions()
    options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return options


def release_arena_after_run() -> ort.RunOptions:
    """Run options that give the CPU arena's free memory back after each run. The arena keeps the largest scene's
    buffers otherwise: published-size encoder, 131k-voxel room, 2 threads, 4.6 GB still held after a run (RSS
    0.93 -> 5.52 GiB, default order) against 0.1 GB with this, for 7.7 s instead of 6.6 s a run; without any
    arena, 9.6 s."""
    options = ort.RunOptions()
    options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return options

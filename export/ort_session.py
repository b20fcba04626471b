"""onnxruntime settings for the exported encoder, shared by the in-process runner (`export.onnxrt`) and the
Triton stub of ``--kind python-onnxruntime`` (`export/triton_models/onnx_encoder.py`). Imports only
onnxruntime, so the stub pulls in nothing else.

Execution order: in the graph's own order (priority-based). Files exported before `export.node_order` existed
list each tap's gather after the previous tap's Gemm, and onnxruntime's default order then makes all 27 gathered
operands of a conv before its first Gemm. Peak RSS above the loaded session, published size, 2 threads,
separate processes (time per run in brackets):

| file, order | 131k-voxel room | 307k voxels |
|---|---|---|
| exporter's listing, default order | 2.60 GiB (8.2-8.7 s) | 5.74 GiB (14.5 s) |
| exporter's listing, priority order | 0.48 GiB (7.2-8.2 s) | 1.05 GiB (14.3 s) |
| `export.node_order` listing, default order | 0.48 GiB (8.3-9.4 s) | 1.20 GiB (13.2 s) |
| `export.node_order` listing, priority order | 0.53 GiB (8.0-8.2 s) | 1.32 GiB (11.7 s) |

(The last two rows ran beside other work; their times are noisier.) Priority order stays the setting, so files
from before `export.node_order` get the low peak too.
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

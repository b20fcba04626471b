"""What the Python steps of a ponder Triton ensemble check in a request before working on it.

The kernel-map step (every kind but python-torch) and the python-torch encoder (which builds its own tables)
both take the gateway's tensors straight from a client. ``build_kernel_maps`` refuses bad coordinates
(`KernelMapError`); `check_scene_request` refuses the rest: ``feat`` rows that do not match the voxels (a table
built for other rows would silently read the wrong ones) and a condition index out of range. Both are client
errors (INVALID_ARG), never a server fault.

`skip_reason` reads the caller's deadline (request parameter ``ponder_deadline_ms``, Unix time in
ms, set by the gateway to its own request deadline): a request still queued when its caller has given up is
skipped, not run, as the in-process worker skips an expired job. Triton does not pass a client's cancellation
on to a step that is already queued, so without this a worker behind on a queue of large scenes would compute
every abandoned one before the next live one. The clocks of gateway and worker hosts are assumed in sync
(NTP); ``DEADLINE_GRACE_S`` absorbs small skews. `checked` is what every Python step does first with a
request: skip it, refuse it, or read it.
"""

from __future__ import annotations

import json
import time

import numpy as np

DEADLINE_PARAMETER = "ponder_deadline_ms"
DEADLINE_GRACE_S = 1.0


def check_scene_request(grid_coord: np.ndarray, feat: np.ndarray, condition: np.ndarray | None,
                        in_channels: int, num_conditions: int) -> int | None:
    """ValueError naming the problem; else the condition index (None for unconditioned models)."""
    if feat.shape != (len(grid_coord), in_channels):
        raise ValueError(f"feat must have shape ({len(grid_coord)}, {in_channels}) for {len(grid_coord)} voxels, "
                         f"got {tuple(feat.shape)}")
    if not num_conditions:
        return None
    if condition is None or condition.size != 1:
        raise ValueError(f"condition must hold one index in [0, {num_conditions}), got "
                         f"{'none' if condition is None else condition.size}")
    index = int(condition.reshape(-1)[0])
    if not 0 <= index < num_conditions:
        raise ValueError(f"condition index {index} out of range [0, {num_conditions})")
    return index


def seconds_past_deadline(parameters: str | dict | None, now: float | None = None) -> float | None:
    """How long ago the deadline in a request's ``parameters`` (a dict, or the JSON text Triton's Python
    backend gives) passed, when that is more than ``DEADLINE_GRACE_S``; else None (no deadline, or not yet).
    ValueError for a deadline that is not an integer."""
    if isinstance(parameters, str):
        parameters = json.loads(parameters or "{}")
    value = (parameters or {}).get(DEADLINE_PARAMETER)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"parameter {DEADLINE_PARAMETER} must be an integer (Unix time in ms), got {value!r}")
    late = (time.time() if now is None else now) - value / 1000.0
    return late if late > DEADLINE_GRACE_S else None


def skip_reason(parameters: str | dict | None) -> str | None:
    """Why a step skips this request (its caller's deadline passed), or None to run it; ValueError as above."""
    late = seconds_past_deadline(parameters)
    return None if late is None else f"skipped: the caller's deadline passed {late:.1f} s before its turn"


def checked(request, model_name: str, pb_utils, read):
    """What a Python step does first with a request: ``(read(request), None)`` to work on it, else ``(None, the
    error response)``: skipped (CANCELLED, and a warning naming the step and the request id) when its caller's
    deadline passed, INVALID_ARG when ``read`` refuses the input (ValueError, KernelMapError included).
    ``pb_utils`` is the stub's ``triton_python_backend_utils``, which exists only inside Triton."""
    try:
        skipped = skip_reason(request.parameters())
        if skipped:
            pb_utils.Logger.log_warn(f"{model_name}: request {request.request_id() or '-'}: {skipped}")
            return None, pb_utils.InferenceResponse(
                error=pb_utils.TritonError(skipped, code=pb_utils.TritonError.CANCELLED))
        return read(request), None
    except ValueError as exc:
        return None, pb_utils.InferenceResponse(
            error=pb_utils.TritonError(str(exc), code=pb_utils.TritonError.INVALID_ARG))

"""The checks the Python steps of a Triton ensemble make before working on a request (export/scene_request.py),
and the deadline the gateway's Triton worker sends for them to read. Their use by real Triton stubs is in
tests/test_service_triton.py."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from export.scene_request import (DEADLINE_GRACE_S, DEADLINE_PARAMETER, check_scene_request, seconds_past_deadline,
                                  skip_reason)
from model.cancel import CancelToken
from service.workers.triton_client import deadline_parameters


def test_feat_rows_and_condition_are_checked():
    grid, feat = np.zeros((3, 3), np.int32), np.zeros((3, 6), np.float32)
    assert check_scene_request(grid, feat, None, 6, 0) is None
    assert check_scene_request(grid, feat, np.array([2]), 6, 3) == 2
    with pytest.raises(ValueError, match=r"feat must have shape \(3, 6\) for 3 voxels, got \(2, 6\)"):
        check_scene_request(grid, feat[:2], None, 6, 0)
    with pytest.raises(ValueError, match=r"feat must have shape \(3, 9\)"):
        check_scene_request(grid, feat, None, 9, 0)
    with pytest.raises(ValueError, match=r"condition index 3 out of range \[0, 3\)"):
        check_scene_request(grid, feat, np.array([3]), 6, 3)
    with pytest.raises(ValueError, match="condition must hold one index"):
        check_scene_request(grid, feat, None, 6, 3)


def test_a_request_is_skipped_only_once_its_deadline_passed_by_more_than_the_grace():
    now = 1_800_000_000.0
    at = int(now * 1000)
    assert seconds_past_deadline({}, now) is None and seconds_past_deadline(None, now) is None
    assert seconds_past_deadline({DEADLINE_PARAMETER: at + 5000}, now) is None  # not yet
    assert seconds_past_deadline({DEADLINE_PARAMETER: at - 500}, now) is None  # within the clocks' grace
    assert seconds_past_deadline({DEADLINE_PARAMETER: at - 3000}, now) == pytest.approx(3.0)
    # Triton's Python backend hands the parameters over as JSON text
    assert seconds_past_deadline(json.dumps({DEADLINE_PARAMETER: at - 3000, "other": "x"}), now) == pytest.approx(3.0)
    assert skip_reason({DEADLINE_PARAMETER: int(time.time() * 1000) - 4000}).startswith(
        "skipped: the caller's deadline passed 4.")
    assert skip_reason({DEADLINE_PARAMETER: int(time.time() * 1000) + 60_000}) is None
    for bad in ("soon", 1.5e12, True):
        with pytest.raises(ValueError, match=f"{DEADLINE_PARAMETER} must be an integer"):
            seconds_past_deadline({DEADLINE_PARAMETER: bad}, now)


def test_the_gateway_sends_its_deadline_in_unix_milliseconds():
    assert deadline_parameters(None) == {} and deadline_parameters(CancelToken()) == {}
    sent = deadline_parameters(CancelToken.after(30.0))[DEADLINE_PARAMETER]
    assert isinstance(sent, int) and abs(sent / 1000 - (time.time() + 30.0)) < 0.5
    expired = deadline_parameters(CancelToken.after(-10.0))
    assert seconds_past_deadline(expired) == pytest.approx(10.0, abs=0.5) and DEADLINE_GRACE_S < 10.0

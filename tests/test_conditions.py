"""The one condition rule (model.conditions) that the Predictor, gateway, Triton client and ONNX runner share."""

import numpy as np
import pytest

from model.conditions import ConditionError, condition_index, default_condition, resolve_condition

PPT = ("Structured3D", "ScanNet", "S3DIS")


def test_unconditioned_models_take_no_condition():
    for none in (None, "", "default"):
        assert resolve_condition((), none) is None and condition_index((), none) is None
    assert condition_index((), 0) is None
    with pytest.raises(ConditionError, match="model 'm' takes no condition"):
        resolve_condition((), "ScanNet", model="m")
    with pytest.raises(ValueError, match="this model takes no condition"):
        condition_index((), 1)


def test_conditioned_models_default_and_refuse_unknown_names():
    assert default_condition(PPT) == "ScanNet" and default_condition(("S3DIS", "X")) == "S3DIS"
    assert resolve_condition(PPT, None) == "ScanNet" and resolve_condition(PPT, "", default="S3DIS") == "S3DIS"
    assert condition_index(PPT, None) == 1 and condition_index(PPT, "S3DIS") == 2
    assert condition_index(PPT, np.int64(0)) == 0
    with pytest.raises(ConditionError, match="unknown condition 'Mars'; valid: Structured3D, ScanNet, S3DIS"):
        resolve_condition(PPT, "Mars")
    with pytest.raises(ConditionError, match="out of range"):
        condition_index(PPT, 3)

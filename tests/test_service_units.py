"""Unit tests of the service's pure parts: settings, answer formats, rate limiting, the circuit breaker,
model cards, JSON logs and the batch client's input/output naming. No server, no model."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time

import numpy as np
import pytest

from model.inference import ModelInfo
from service.encoding import OutputFormat, Payload, arrow_available, encode, negotiate
from service.errors import ApiError
from service.extract import expand_inputs, output_paths, write_atomic
from service.logs import JsonFormatter, request_id_var
from service.middleware import TokenBuckets
from service.settings import ServiceSettings
from service.workers.base import ModelCard
from service.workers.loading import discover_checkpoints
from service.workers.triton_client import CircuitBreaker, _short


def body_of(response) -> bytes:
    if hasattr(response, "body_iterator"):
        async def collect():
            return b"".join([chunk async for chunk in response.body_iterator])
        return asyncio.run(collect())
    return response.body


# -- settings -------------------------------------------------------------------------------------------
def test_settings_precedence_keywords_env_file_defaults(tmp_path, monkeypatch):
    config = tmp_path / "ponder.yaml"
    config.write_text("max_batch: 7\nqueue_size: 3\napi_keys: [a, b]\n")
    monkeypatch.setenv("PONDER_QUEUE_SIZE", "9")
    monkeypatch.setenv("PONDER_TRITON_URLS", "h1:8001, h2:8001")
    settings = ServiceSettings(config_file=config, max_wait_ms=1)
    assert settings.max_batch == 7 and settings.queue_size == 9 and settings.max_wait_ms == 1
    assert settings.api_keys == ["a", "b"] and settings.triton_urls == ["h1:8001", "h2:8001"]
    assert settings.max_points == 5_000_000  # default
    monkeypatch.setenv("PONDER_CONFIG_FILE", str(config))
    assert ServiceSettings().max_batch == 7
    json_config = tmp_path / "ponder.json"
    json_config.write_text(json.dumps({"worker": "triton"}))
    assert ServiceSettings(config_file=json_config).worker == "triton"


@pytest.mark.parametrize("text, message", [("[1, 2", "not valid"), ("- a\n- b\n", "mapping"),
                                           ("no_such_setting: 1\n", "no_such_setting")])
def test_bad_config_files_are_named(tmp_path, text, message):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    with pytest.raises(ValueError, match=message):
        ServiceSettings(config_file=config)
    with pytest.raises(ValueError, match="cannot read"):
        ServiceSettings(config_file=tmp_path / "missing.yaml")


# -- answer formats ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("accept, expected", [
    (None, OutputFormat.AUTO), ("*/*", OutputFormat.AUTO), ("application/x-npy", OutputFormat.NPY),
    ("application/octet-stream", OutputFormat.NPY), ("application/zip", OutputFormat.NPZ),
    ("application/json;q=0.2, application/x-npz;q=0.9", OutputFormat.NPZ),
    ("text/html, application/x-npy;q=0.1", OutputFormat.NPY),
])
def test_accept_negotiation(accept, expected):
    assert negotiate(accept) is expected


def test_unservable_accept_is_406_listing_formats():
    with pytest.raises(ApiError) as error:
        negotiate("text/html, application/json;q=0")
    assert error.value.status == 406 and "application/x-npy" in error.value.detail


def test_binary_answers_round_trip():
    features = np.random.default_rng(0).normal(size=(3000, 24)).astype(np.float32)
    index = np.arange(3000, dtype=np.int64)
    single = Payload({"features": features}, {"model": "m", "num_points": 3000})
    npy = encode(single, OutputFormat.NPY, 10)
    content = body_of(npy)
    assert npy.headers["content-length"] == str(len(content)) and npy.headers["x-ponder-num-points"] == "3000"
    np.testing.assert_array_equal(np.load(io.BytesIO(content)), features)
    several = Payload({"features": features, "index": index}, {"class_names": ["a", "b"], "model": "m"})
    with np.load(io.BytesIO(body_of(encode(several, OutputFormat.NPZ, 10)))) as archive:
        np.testing.assert_array_equal(archive["features"], features)
        assert list(archive["class_names"]) == ["a", "b"] and str(archive["model"]) == "m"
    with pytest.raises(ApiError, match="NPY holds one"):
        encode(several, OutputFormat.NPY, 10)
    if arrow_available():
        import pyarrow as pa

        table = pa.ipc.open_stream(body_of(encode(several, OutputFormat.ARROW, 10))).read_all()
        assert table.num_rows == 3000 and json.loads(table.schema.metadata[b"class_names"]) == ["a", "b"]
        np.testing.assert_array_equal(np.stack(table.column("features").to_numpy(zero_copy_only=False)), features)
        ragged = Payload({"features": features, "grid": np.zeros((10, 3), np.int32)})
        with pytest.raises(ApiError, match="x-npz"):
            encode(ragged, OutputFormat.ARROW, 10)


def test_json_answer_size_limit():
    payload = Payload({"features": np.ones((10, 4), np.float16)}, {"model": "m"})
    body = json.loads(encode(payload, OutputFormat.JSON, 40).body)
    assert body["features_shape"] == [10, 4] and body["features_dtype"] == "float16" and body["model"] == "m"
    with pytest.raises(ApiError) as error:
        encode(payload, OutputFormat.JSON, 39)
    assert error.value.status == 406 and "application/x-npz" in error.value.detail


# -- limits and robustness -------------------------------------------------------------------------------
def test_token_bucket_refills_at_its_rate():
    buckets = TokenBuckets(rate=2.0, burst=3)
    assert [buckets.take("k", now=0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("k", now=0.0) == pytest.approx(0.5)
    assert buckets.take("other", now=0.0) == 0.0  # per key
    assert buckets.take("k", now=0.5) == 0.0  # one token back after 1/rate s
    assert buckets.take("k", now=0.5) > 0


def test_circuit_breaker_opens_then_half_opens_for_one_trial():
    breaker = CircuitBreaker(failures=2, reset_s=0.05)
    breaker.record(False)
    assert breaker.allow()
    breaker.record(False)
    assert breaker.state == "open" and not breaker.allow()
    time.sleep(0.06)
    assert breaker.allow() and not breaker.allow()  # one trial at a time
    breaker.record(False)
    assert breaker.state == "open"
    time.sleep(0.06)
    assert breaker.allow()
    breaker.record(True)
    assert breaker.state == "closed" and breaker.allow()


def test_triton_error_text_is_shortened_to_the_exception_line():
    message = "Model execute error: Traceback (most recent call last):\n  File x\nValueError: unknown condition 'X'\n\nAt:\n"
    assert _short(message) == "ValueError: unknown condition 'X'"


def card(conditions=(), names=None) -> ModelCard:
    info = ModelInfo(name="m", kind="segmentor", conditions=conditions, class_names=names or {},
                     feature_dim=8, grid_size=0.02, input_features=("color", "normal"), version="1")
    return ModelCard(info=info, has_classifier=True, default_condition=conditions[1] if conditions else None)


def test_model_card_conditions_and_class_names():
    plain = card(names={"default": ("a", "b")})
    assert plain.resolve_condition(None) is None and plain.resolve_condition("default") is None
    with pytest.raises(ValueError, match="takes no condition"):
        plain.resolve_condition("S3DIS")
    assert plain.class_names(None, 2) == ("a", "b") and plain.class_names(None, 3) == ("class0", "class1", "class2")
    ppt = card(("Structured3D", "ScanNet"), {"ScanNet": ("x",)})
    assert ppt.resolve_condition(None) == "ScanNet" and ppt.resolve_condition("Structured3D") == "Structured3D"
    with pytest.raises(ValueError, match="valid: Structured3D, ScanNet"):
        ppt.resolve_condition("Mars")
    assert ModelCard.from_dict(json.loads(json.dumps(ppt.to_dict()))) == ppt


def test_json_logs_carry_the_request_id():
    record = logging.LogRecord("service.test", logging.INFO, __file__, 1, "hello %s", ("world",), None)
    record.status = 200
    token = request_id_var.set("rid-1")
    try:
        line = json.loads(JsonFormatter().format(record))
    finally:
        request_id_var.reset(token)
    assert line["msg"] == "hello world" and line["request_id"] == "rid-1" and line["status"] == 200


# -- checkpoints and the batch client -------------------------------------------------------------------------
def test_checkpoint_discovery_names(tmp_path):
    (tmp_path / "b.pth").write_bytes(b"")
    (tmp_path / "a_folder").mkdir()
    (tmp_path / "notes.md").write_text("x")
    assert list(discover_checkpoints(None, tmp_path)) == ["a_folder", "b"]
    nested = tmp_path / "scannet_model"
    nested.mkdir()
    (nested / "checkpoint.pth").write_bytes(b"")
    assert list(discover_checkpoints(nested / "checkpoint.pth", None)) == ["scannet_model"]
    from model.inference import DEFAULT_MODEL_DIR

    assert discover_checkpoints(None, None) == {"default": None, "default-detect": DEFAULT_MODEL_DIR / "detect",
                                                "default-render": DEFAULT_MODEL_DIR / "render"}
    with pytest.raises(ValueError, match="does not exist"):
        discover_checkpoints(tmp_path / "missing.pth", None)


def test_extract_inputs_and_output_names(tmp_path_factory, tmp_path):
    (tmp_path / "a").mkdir()
    for name in ("a/x.ply", "a/y.las", "b.npz", "b.ply", "notes.md"):
        (tmp_path / name).write_bytes(b"data")
    listing = tmp_path_factory.mktemp("lists") / "list.txt"  # relative entries resolve against the list's folder
    listing.write_text(f"{tmp_path / 'a/x.ply'}\n# comment\n{tmp_path / 'b.npz'}\n")
    assert [p.name for p in expand_inputs([str(listing)])] == ["x.ply", "b.npz"]
    assert {p.name for p in expand_inputs([str(tmp_path / "a" / "*.l*")])} == {"y.las"}
    everything = expand_inputs([str(tmp_path)])
    assert {p.name for p in everything} == {"x.ply", "y.las", "b.npz", "b.ply"}
    targets = output_paths(everything, tmp_path / "out", ".npy")
    rel = {p.name: t.relative_to(tmp_path / "out").as_posix() for p, t in targets.items()}
    assert rel == {"x.ply": "a/x.npy", "y.las": "a/y.npy", "b.npz": "b.npz.npy", "b.ply": "b.ply.npy"}
    with pytest.raises(ValueError, match="not a file"):
        expand_inputs([str(tmp_path / "missing")])


def test_atomic_write_leaves_no_temporary(tmp_path):
    target = tmp_path / "deep" / "f.npy"
    write_atomic(np.ones((4, 2), np.float32), target, "npy")
    assert np.load(target).shape == (4, 2)
    assert [p.name for p in target.parent.iterdir()] == ["f.npy"]


def test_token_buckets_forget_refilled_keys_past_the_cap():
    buckets = TokenBuckets(rate=1.0, burst=2, max_keys=3)
    for i in range(3):
        buckets.take(f"ip{i}", now=0.0)
    buckets.take("ip3", now=10.0)  # the others have refilled: forgotten, not kept forever
    assert set(buckets._buckets) == {"ip3"}

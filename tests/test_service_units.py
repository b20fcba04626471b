"""Unit tests of the service's pure parts: settings, answer formats, rate limiting, the circuit breaker,
model cards, JSON logs and the batch client's input/output naming. No server, no model."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from datetime import timedelta

import httpx
import numpy as np
import pybreaker
import pytest

from model.inference import ModelInfo
from service.encoding import OutputFormat, Payload, arrow_available, encode, negotiate, require_fit
from service.client import PonderError, retrying_answers
from service.errors import ApiError
from service.extract_inputs import expand_inputs, output_paths
from service.extract_manifest import write_atomic
from service.logs import JsonFormatter, request_id_var
from service.middleware import TokenBuckets
from service.settings import ServiceSettings
from service.workers.base import ModelCard, WorkerInputError
from service.workers.loading import discover_checkpoints
from service.workers.triton_cards import card_differences, served_from_metadata
from service.workers.triton_endpoint import EndpointBreaker, short_error


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
    ("text/html, application/x-npy;q=0.1", OutputFormat.NPY), ("application/*", OutputFormat.AUTO),
    ("*/*;q=0.5, application/x-npy", OutputFormat.NPY),  # a named type beats a wildcard of equal or lower q
    ("application/json;q=0.2, */*;q=0.9", OutputFormat.AUTO),
])
def test_accept_negotiation(accept, expected):
    assert negotiate(accept) is expected


def test_unservable_accept_is_406_listing_formats():
    with pytest.raises(ApiError) as error:
        negotiate("text/html, application/json;q=0")
    assert error.value.status == 406 and "application/x-npy" in error.value.detail
    with pytest.raises(ApiError, match="cannot parse the Accept header") as error:
        negotiate("npy")
    assert error.value.status == 406


def test_render_and_detect_accept_rules():
    from service.encoding import best_media
    from service.routers.render import PNG, ZIP, answer_type

    assert [answer_type(accept, 1) for accept in (None, "*/*", "image/*", "application/*", ZIP)] == \
        [PNG, PNG, PNG, ZIP, ZIP]
    assert answer_type("*/*", 2) == ZIP and answer_type("image/png;q=0.5, application/zip;q=0.4", 1) == PNG
    with pytest.raises(ApiError, match="ask for application/zip"):
        answer_type("image/png", 2)
    # /v1/detect answers JSON only: acceptable unless the client excludes it
    json_only = ["application/json"]
    assert best_media("text/html;q=0.5, application/json, image/png;q=0", json_only) == ("application/json", False)
    assert best_media(None, json_only) == ("application/json", True)
    assert best_media("application/*", json_only) == ("application/json", True)
    assert best_media("image/png", json_only)[0] == "" and best_media("application/json;q=0", json_only)[0] == ""


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
    with pytest.raises(ApiError) as mixed:  # only the formats that can carry it are suggested
        require_fit(OutputFormat.NPY, ["features", "point_to_voxel"], mixed_rows=True)
    assert OutputFormat.NPZ.value in mixed.value.detail and OutputFormat.ARROW.value not in mixed.value.detail
    auto = encode(several, OutputFormat.AUTO, 10)  # over the JSON limit: answered as NPZ, the hint names no JSON
    hint = auto.headers["x-ponder-hint"].split("choose with Accept:")[1]
    assert OutputFormat.JSON.value not in hint and OutputFormat.NPY.value not in hint and OutputFormat.NPZ.value in hint
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


def _call(breaker: EndpointBreaker, error: Exception | None = None) -> None:
    """One guarded call that fails with ``error`` (re-raised to the caller) or succeeds."""
    with breaker.calling():
        if error is not None:
            raise error


def _age(breaker: EndpointBreaker, seconds: float) -> None:
    """Move the breaker's opening time back, as if ``seconds`` had passed (pybreaker's storage API)."""
    breaker.storage.opened_at = breaker.storage.opened_at - timedelta(seconds=seconds)


def test_circuit_breaker_opens_then_admits_one_trial():
    breaker = EndpointBreaker(failures=2, reset_s=30.0, name="endpoint")
    with pytest.raises(OSError):
        _call(breaker, OSError("down"))
    assert breaker.admits() and breaker.current_state == "closed"
    with pytest.raises(WorkerInputError):  # the input's fault, not the server's: counts as a success
        _call(breaker, WorkerInputError("bad input"))
    for _ in range(2):
        with pytest.raises(OSError):
            _call(breaker, OSError("down"))
    assert breaker.current_state == "open" and breaker.refusing and not breaker.admits()
    with pytest.raises(pybreaker.CircuitBreakerError):
        _call(breaker)
    _age(breaker, 31)
    assert not breaker.refusing and breaker.admits()
    with pytest.raises(OSError):  # the trial fails: open again for another reset_s
        _call(breaker, OSError("still down"))
    assert breaker.refusing and not breaker.admits()
    _age(breaker, 31)
    trial = breaker.calling()
    trial.__enter__()
    assert breaker.current_state == "half-open" and not breaker.admits()  # one trial at a time
    trial.__exit__(None, None, None)
    assert breaker.current_state == "closed" and breaker.admits()


@pytest.mark.parametrize("asynchronous", [False, True])
def test_retries_honour_retry_after_then_return_the_last_answer(asynchronous):
    answers = iter([httpx.Response(503, headers={"Retry-After": "7"}), httpx.Response(429),
                    httpx.Response(503), httpx.Response(200)])
    waits: list[float] = []

    def call():
        return next(answers)

    async def call_async():
        return next(answers)

    async def sleep_async(seconds):
        waits.append(seconds)

    policy = retrying_answers(retries=2, backoff_s=0.5, asynchronous=asynchronous,
                              sleep=sleep_async if asynchronous else waits.append)
    last = asyncio.run(policy(call_async)) if asynchronous else policy(call)
    assert last.status_code == 503 and waits == [7.0, 1.0]  # Retry-After, then 0.5 * 2 (the second retry)
    assert next(answers).status_code == 200  # three attempts made, not four


def test_extract_gives_up_with_the_last_error():
    import service.extract as extract

    calls = 0

    async def refused(*args, **kwargs):
        nonlocal calls
        calls += 1
        raise httpx.ConnectError("connection refused")

    async def no_sleep(seconds):
        pass

    policy = retrying_answers(1, 0.01, extract.EXTRACT_RETRY_STATUSES, asynchronous=True, sleep=no_sleep,
                              retry_error_callback=extract._gave_up)
    with pytest.raises(PonderError, match="ConnectError: connection refused \\(after 2 attempts\\)"):
        asyncio.run(policy(refused))
    assert calls == 2


def test_triton_error_text_is_shortened_to_the_exception_line():
    message = "Model execute error: Traceback (most recent call last):\n  File x\nValueError: unknown condition 'X'\n\nAt:\n"
    assert short_error(message) == "ValueError: unknown condition 'X'"


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


def test_endpoints_with_the_same_shapes_but_other_weights_are_told_apart():
    """A rolling upgrade to fine-tuned weights keeps every shape: only the export's weights digest tells the
    endpoints apart, so the gateway never mixes two models' numbers under one name."""
    meta = {"kind": "segmentor", "out_channels": 32, "in_channels": 6, "grid_size": 0.02, "conditions": [],
            "class_names": {"default": ["a", "b"]}, "num_classes": {"default": 2}, "outputs": ["backbone_feat"]}
    old = served_from_metadata("ponder", {**meta, "weights_sha256": "a" * 64})
    new = served_from_metadata("ponder", {**meta, "weights_sha256": "b" * 64})
    assert old != new and old == served_from_metadata("ponder", {**meta, "weights_sha256": "a" * 64})
    assert card_differences(new, old) == "weights bbbbbbbbbbbb, expected aaaaaaaaaaaa"
    assert "feature_dim 24, expected 32" in card_differences(served_from_metadata("ponder", {**meta, "out_channels": 24}),
                                                             old)


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
    with pytest.raises(ValueError, match=r"b\.npz and .*b\.ply would both be written to .*b\.npy"):  # one name
        output_paths(everything, tmp_path / "out", ".npy")
    targets = output_paths([p for p in everything if p.name != "b.ply"], tmp_path / "out", ".npy")
    rel = {p.name: t.relative_to(tmp_path / "out").as_posix() for p, t in targets.items()}
    assert rel == {"x.ply": "a/x.npy", "y.las": "a/y.npy", "b.npz": "b.npy"}  # names never depend on the others
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

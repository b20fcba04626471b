"""Answer formats chosen by the ``Accept`` header: JSON (small answers), NPY (one array), NPZ (several
arrays) and the Arrow IPC stream format (when pyarrow imports). Binary answers are streamed in chunks, so
a million-point answer never needs a second full copy in memory; a JSON answer over the configured size
asked for explicitly is refused with 406 and a message naming the binary formats. ``*/*`` (curl's default) or
no Accept gets JSON when the answer is small and NPY/NPZ otherwise, with an ``X-Ponder-Hint`` header."""

from __future__ import annotations

import io
import json
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum

import mimeparse
import numpy as np
from starlette.responses import Response, StreamingResponse

from service.errors import ApiError

CHUNK = 1 << 20


class OutputFormat(str, Enum):
    JSON = "application/json"
    NPY = "application/x-npy"
    NPZ = "application/x-npz"
    ARROW = "application/vnd.apache.arrow.stream"
    AUTO = "*/*"  # no preference: JSON when small enough, else NPY (one array) or NPZ; never offered by name


# Media types a client may send that mean one of ours.
_ALIASES = {
    "application/json": OutputFormat.JSON,
    "application/x-npy": OutputFormat.NPY,
    "application/octet-stream": OutputFormat.NPY,
    "application/x-npz": OutputFormat.NPZ,
    "application/zip": OutputFormat.NPZ,
    "application/vnd.apache.arrow.stream": OutputFormat.ARROW,
}


def arrow_available() -> bool:
    """pyarrow is optional at run time: a build that fails to import (e.g. one made for numpy 2) only
    removes the Arrow format."""
    try:
        import pyarrow  # noqa: F401
    except Exception:  # noqa: BLE001 - ImportError, or numpy ABI errors raised at import
        return False
    return True


def available_formats() -> list[OutputFormat]:
    return [f for f in OutputFormat
            if f is not OutputFormat.AUTO and (f is not OutputFormat.ARROW or arrow_available())]


def parse_accept(accept: str | None) -> list[tuple[str, str, dict]]:
    """The media ranges of an ``Accept`` header parsed by python-mimeparse (``q`` always set); an absent or
    blank header means ``*/*``. A range that is not ``type/subtype`` is a 406 naming it."""
    if not accept or not accept.strip():
        accept = "*/*"
    try:
        return [mimeparse.parse_media_range(item) for item in accept.split(",") if item.strip()]
    except mimeparse.MimeTypeParseException as exc:
        raise ApiError(406, f"cannot parse the Accept header {accept!r}: {exc}") from exc


def best_media(accept: str | None, supported: list[str]) -> tuple[str, bool]:
    """The entry of ``supported`` that ``accept`` ranks highest, by python-mimeparse's ``best_match`` rules
    (q-value, then the most specific matching range; a tie goes to the later entry of ``supported``), and whether
    it matched only through a wildcard range (``*/*``, ``application/*``): the client has no preference.
    ``("", False)`` when nothing in ``supported`` is acceptable."""
    ranges = parse_accept(accept)
    best = mimeparse.best_match(supported, accept if accept and accept.strip() else "*/*")
    if not best:
        return "", False
    _, fitness = mimeparse.quality_and_fitness_parsed(best, ranges)
    return best, fitness < 110  # 100 for the type + 10 for the subtype matched without a wildcard


def negotiate(accept: str | None) -> OutputFormat:
    """The best format for an ``Accept`` header (q-values honoured; a wildcard or no header -> AUTO)."""
    offered = available_formats()
    # In increasing preference for ties: the binary formats, then JSON (a client naming JSON among equals wants it).
    supported = [media for media, fmt in _ALIASES.items() if fmt in offered and fmt is not OutputFormat.JSON]
    supported.append(OutputFormat.JSON.value)
    media, wildcard = best_media(accept, supported)
    if not media:
        names = ", ".join(f.value for f in offered)
        raise ApiError(406, f"cannot answer in {accept!r}; available formats: {names}")
    return OutputFormat.AUTO if wildcard else _ALIASES[media]


@dataclass
class Payload:
    """What an endpoint answers: named arrays (the first is the main one) and JSON-able metadata.
    ``extra_arrays`` ride along only in the multi-array binary formats (NPZ, Arrow), e.g. the fused ``coord``
    of an RGB-D upload, which would swell a JSON answer and cannot share an NPY file."""

    arrays: dict[str, np.ndarray]
    meta: dict = field(default_factory=dict)
    extra_arrays: dict[str, np.ndarray] = field(default_factory=dict)

    def with_extras(self) -> "Payload":
        return Payload(arrays={**self.arrays, **self.extra_arrays}, meta=self.meta)

    @property
    def num_values(self) -> int:
        return sum(int(a.size) for a in self.arrays.values())


def _meta_headers(meta: dict) -> dict[str, str]:
    headers = {}
    for key, value in meta.items():
        if value is None:
            continue
        text = json.dumps(value) if not isinstance(value, str) else value
        if len(text) <= 4096 and text.isascii():
            headers["X-Ponder-" + key.replace("_", "-").title()] = text
    return headers


def require_fit(fmt: OutputFormat, arrays: list[str], mixed_rows: bool = False) -> None:
    """406 when ``fmt`` cannot carry an answer of these named arrays: NPY holds one array, an Arrow table one
    row count (``mixed_rows``: per-voxel beside per-point arrays). Routes call it before reading the upload, so
    a client is not refused only after its scene went through the encoder."""
    if fmt is OutputFormat.NPY and len(arrays) != 1:
        other = "" if mixed_rows else f" or {OutputFormat.ARROW.value}"  # name only formats that can carry it
        raise ApiError(406, f"this answer has several arrays ({', '.join(arrays)}); NPY holds one: ask for "
                            f"{OutputFormat.NPZ.value}{other}")
    if fmt is OutputFormat.ARROW and mixed_rows:
        raise ApiError(406, "this answer mixes per-voxel and per-point arrays, which one Arrow table cannot "
                            f"hold: ask for {OutputFormat.NPZ.value}")


def encode(payload: Payload, fmt: OutputFormat, max_json_values: int) -> Response:
    """Serialise ``payload`` as ``fmt`` (406 when the format cannot carry it)."""
    hint = None
    if fmt is OutputFormat.AUTO:
        if payload.num_values <= max_json_values:
            return _json(payload, max_json_values)
        fmt = OutputFormat.NPY if len(payload.arrays) == 1 else OutputFormat.NPZ
        choices = [f.value for f in (OutputFormat.NPY, OutputFormat.NPZ) if f is not OutputFormat.NPY
                   or len(payload.arrays) == 1] + ([OutputFormat.ARROW.value] if arrow_available() else [])
        hint = (f"answered as {fmt.value}: {payload.num_values} values are over the JSON limit of {max_json_values} "
                f"(PONDER_MAX_JSON_VALUES: asked for as JSON it would be a 406); choose with Accept: "
                f"{', '.join(choices)}")
    if fmt is OutputFormat.JSON:
        return _json(payload, max_json_values)
    headers = _meta_headers(payload.meta)
    if hint:
        headers["X-Ponder-Hint"] = hint
    if fmt is OutputFormat.NPY:
        require_fit(fmt, list(payload.arrays))
        (array,) = payload.arrays.values()
        size, chunks = _npy_chunks(array)
        headers["Content-Length"] = str(size)
        return StreamingResponse(chunks, media_type=fmt.value, headers=headers)
    if fmt is OutputFormat.NPZ:
        size, chunks = _npz_chunks(payload.with_extras())
        headers["Content-Length"] = str(size)
        headers["Content-Disposition"] = 'attachment; filename="result.npz"'
        return StreamingResponse(chunks, media_type=fmt.value, headers=headers)
    payload = payload.with_extras()
    require_fit(fmt, list(payload.arrays), mixed_rows=len({len(a) for a in payload.arrays.values()}) != 1)
    return StreamingResponse(_arrow_chunks(payload), media_type=fmt.value, headers=headers)


def _json(payload: Payload, max_json_values: int) -> Response:
    if payload.num_values > max_json_values:
        raise ApiError(406, f"the answer has {payload.num_values} values, more than the JSON limit of "
                            f"{max_json_values} (PONDER_MAX_JSON_VALUES); ask for a binary format with "
                            f"'Accept: {OutputFormat.NPY.value}', '{OutputFormat.NPZ.value}' or "
                            f"'{OutputFormat.ARROW.value}'")
    body = dict(payload.meta)
    for name, array in payload.arrays.items():
        body[name] = array.tolist()
        body[f"{name}_shape"] = list(array.shape)
        body[f"{name}_dtype"] = str(array.dtype)
    return Response(json.dumps(body, separators=(",", ":")), media_type=OutputFormat.JSON.value)


def _npy_chunks(array: np.ndarray) -> tuple[int, Iterator[bytes]]:
    array = np.ascontiguousarray(array)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(array))
    head = header.getvalue()

    def chunks() -> Iterator[bytes]:
        yield head
        flat = memoryview(array.reshape(-1).view(np.uint8))
        for start in range(0, len(flat), CHUNK):
            yield bytes(flat[start:start + CHUNK])

    return len(head) + array.nbytes, chunks()


def _meta_array(value) -> np.ndarray | None:
    """A metadata value as an NPZ member (the body keeps what headers carry, for clients that save only
    the file): strings, numbers, and lists of strings or of numbers (``grid_shape``, ``bounds``,
    ``up_rotation``); None for anything else (nested dicts, ragged lists)."""
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return np.array(value, dtype=str)
    if isinstance(value, (str, int, float)):
        return np.array(value)
    if isinstance(value, (list, tuple)):
        try:
            array = np.asarray(value)
        except ValueError:  # ragged
            return None
        return array if array.dtype.kind in "biuf" else None
    return None


def _npz_chunks(payload: Payload) -> tuple[int, Iterator[bytes]]:
    """Uncompressed NPZ spooled to a temporary file (memory up to 32 MiB, then disk), then streamed."""
    spool = tempfile.SpooledTemporaryFile(max_size=32 << 20)
    extra = {key: array for key, value in payload.meta.items()
             if key not in payload.arrays and (array := _meta_array(value)) is not None}
    np.savez(spool, **payload.arrays, **extra)
    size = spool.tell()
    spool.seek(0)

    def chunks() -> Iterator[bytes]:
        try:
            while block := spool.read(CHUNK):
                yield block
        finally:
            spool.close()

    return size, chunks()


def _arrow_chunks(payload: Payload, rows_per_batch: int = 65536) -> Iterator[bytes]:
    """Arrow IPC stream: matrices become FixedSizeList columns; metadata rides in the schema."""
    import pyarrow as pa

    def column(array: np.ndarray) -> pa.Array:
        if array.ndim == 1:
            return pa.array(array)
        flat = pa.array(np.ascontiguousarray(array).reshape(-1))
        return pa.FixedSizeListArray.from_arrays(flat, int(np.prod(array.shape[1:])))

    names = list(payload.arrays)
    first = payload.arrays[names[0]]
    schema_meta = {k: json.dumps(v) for k, v in payload.meta.items()}
    sample = pa.record_batch([column(a[:0]) for a in payload.arrays.values()], names=names)
    schema = sample.schema.with_metadata(schema_meta)
    sink = io.BytesIO()
    writer = pa.ipc.new_stream(sink, schema)

    def drain() -> bytes:
        data = sink.getvalue()
        sink.seek(0)
        sink.truncate()
        return data

    yield drain()
    for start in range(0, max(len(first), 1), rows_per_batch):
        stop = start + rows_per_batch
        batch = pa.record_batch([column(a[start:stop]) for a in payload.arrays.values()], schema=schema)
        writer.write_batch(batch)
        yield drain()
    writer.close()
    yield drain()

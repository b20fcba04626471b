"""Property-based fuzzing of every reader: files written by the formats' own libraries, then mutated in the
header (numbers replaced by hostile ones: negative, 2^31, 2^64, 10^12 ...) and in the body (overwritten,
inserted or deleted bytes, truncation). Each case must either decode to a valid PointCloud or raise
PointCloudError naming the source: never another exception (MemoryError included), never more than a
bounded peak-RSS growth, never past hypothesis' per-example deadline. ``-m slow`` runs 10x more cases."""

from __future__ import annotations

import io
import re
import struct
import sys
import tempfile
import zipfile
import zlib
from datetime import timedelta
from pathlib import Path

import laspy
import numpy as np
import pypcd4
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from plyfile import PlyData, PlyElement

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest_service import png_bytes, write_format  # noqa: E402
from test_reader_limits import MiB, peak_growth, small_cloud  # noqa: E402

from model.pointcloud.cloud import PointCloud, PointCloudError  # noqa: E402
from model.pointcloud.readers import ReadLimits, read_point_cloud  # noqa: E402

# Room for the few-KB inputs, so that only a header's claims could make a reader allocate more.
LIMITS = ReadLimits(max_points=1_000_000, max_bytes=64 * MiB)
MEMORY_BOUND = 192 * MiB  # peak RSS growth per example: the budget plus generous slack for estimates
DEADLINE = timedelta(seconds=5)  # per example; every case here is a few KB, decoded in milliseconds
HOSTILE_NUMBERS = (-(2**63), -(2**31), -1, 0, 1, 2, 255, 65535, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**53,
                   2**63 - 1, 2**64, 10**12, 10**30)


def _ply(cloud: PointCloud, text: bool, faces_first: bool = False) -> bytes:
    rows = np.empty(len(cloud), dtype=[("x", "f4"), ("y", "f4"), ("z", "f4"), ("red", "u1"), ("green", "u1"),
                                       ("blue", "u1")])
    for i, axis in enumerate("xyz"):
        rows[axis] = cloud.coord[:, i]
    for i, channel in enumerate(("red", "green", "blue")):
        rows[channel] = cloud.color[:, i]
    faces = np.empty(4, dtype=[("vertex_indices", "i4", (3,))])
    faces["vertex_indices"] = [[0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 5]]
    elements = [PlyElement.describe(rows, "vertex"), PlyElement.describe(faces, "face")]
    buffer = io.BytesIO()
    PlyData(elements[::-1] if faces_first else elements, text=text).write(buffer)
    return buffer.getvalue()


def _pcd(cloud: PointCloud, encoding: pypcd4.Encoding, tmp: Path) -> bytes:
    packed = pypcd4.PointCloud.encode_rgb(cloud.color).view(np.uint32)
    columns = [*cloud.coord.T, packed, *cloud.normal.T]
    fields = ("x", "y", "z", "rgb", "normal_x", "normal_y", "normal_z")
    path = tmp / f"{encoding.value}.pcd"
    pypcd4.PointCloud.from_points(columns, fields, [np.float32] * 3 + [np.uint32] + [np.float32] * 3).save(
        path, encoding=encoding)
    return path.read_bytes()


def _las14(cloud: PointCloud, path: Path) -> bytes:
    las = laspy.create(point_format=6, file_version="1.4")
    las.header.scales = np.array([0.001, 0.001, 0.001])
    las.header.offsets = np.zeros(3)
    las.x, las.y, las.z = cloud.coord.astype(np.float64).T
    las.intensity = np.arange(len(cloud), dtype=np.uint16)
    las.write(str(path))
    return path.read_bytes()


def _base_files(tmp: Path) -> dict[str, tuple[bytes, str]]:
    """case -> (file bytes, format), each written by its format's library."""
    cloud = small_cloud(40)
    files = {fmt: (write_format(cloud, tmp / f"a.{fmt}").read_bytes(), fmt)
             for fmt in ("ply", "las", "laz", "npy", "npz", "xyz", "bin")}
    files["ply-ascii"] = (_ply(cloud, text=True), "ply")
    files["ply-faces-first"] = (_ply(cloud, text=False, faces_first=True), "ply")
    files["ply-ascii-faces-first"] = (_ply(cloud, text=True, faces_first=True), "ply")
    for suffix in ("las", "laz"):  # LAS 1.4, point format 6 (64-bit counts, EVLRs), beside write_format's 1.2
        files[f"{suffix}-1.4"] = (_las14(cloud, tmp / f"v14.{suffix}"), suffix)
    for encoding in (pypcd4.Encoding.BINARY, pypcd4.Encoding.ASCII, pypcd4.Encoding.BINARY_COMPRESSED):
        files[f"pcd-{encoding.value}"] = (_pcd(cloud, encoding, tmp), "pcd")
    return files


with tempfile.TemporaryDirectory(prefix="reader-fuzz-") as _tmp:
    BASE = _base_files(Path(_tmp))


def _header_end(data: bytes) -> int:
    """Where the text header ends (PLY, PCD, NPY dict), else the first 400 bytes (binary headers)."""
    for marker in (b"end_header\n", b"DATA ascii\n", b"DATA binary\n", b"DATA binary_compressed\n", b"}"):
        at = data.find(marker)
        if 0 <= at < 4096:
            return at + len(marker)
    return min(len(data), 400)


@st.composite
def mutations(draw, data: bytes) -> bytes:
    """One to three mutations, biased towards the header where the sizes live."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 3))):
        end = max(1, min(_header_end(bytes(out)), len(out)))
        kind = draw(st.sampled_from(["number", "number", "int32", "int64", "overwrite", "insert", "delete",
                                     "truncate"]))
        value = draw(st.sampled_from(HOSTILE_NUMBERS) | st.integers(-(2**40), 2**40))
        if kind == "number":  # a decimal number in a text header → a hostile one
            numbers = list(re.finditer(rb"-?\d+", bytes(out[:end])))
            if numbers:
                match = numbers[draw(st.integers(0, len(numbers) - 1))]
                out[match.start():match.end()] = str(value).encode()
                continue
            kind = "int32"
        if kind in ("int32", "int64"):  # a binary header field → a hostile one
            size, fmt = (4, "<I") if kind == "int32" else (8, "<Q")
            if len(out) >= size:
                at = draw(st.integers(0, max(0, min(end, len(out)) - size)))
                struct.pack_into(fmt, out, at, value % (1 << (8 * size)))
        elif kind == "overwrite":
            at = draw(st.integers(0, len(out) - 1))
            chunk = draw(st.binary(min_size=1, max_size=8))
            out[at:at + len(chunk)] = chunk
        elif kind == "insert":
            at = draw(st.integers(0, len(out)))
            out[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            at = draw(st.integers(0, len(out) - 1))
            del out[at:at + draw(st.integers(1, 16))]
        else:
            out = out[:draw(st.integers(0, len(out)))]
        if not out:
            break
    return bytes(out)


def decode_or_refuse(data: bytes, fmt: str) -> None:
    """The property: a valid cloud or a PointCloudError naming the source, within the memory bound.
    Any other exception propagates and fails the example."""
    outcome: dict[str, object] = {}

    def read() -> None:
        try:
            outcome["cloud"] = read_point_cloud(data, format=fmt, name=f"fuzz.{fmt}", limits=LIMITS)
        except PointCloudError as error:
            outcome["error"] = error

    growth = peak_growth(read)
    assert growth < MEMORY_BOUND, f"peak RSS grew {growth / MiB:.0f} MiB"
    if "error" in outcome:
        assert "fuzz." in str(outcome["error"]) and len(str(outcome["error"])) < 2000
        return
    cloud = outcome["cloud"]
    assert isinstance(cloud, PointCloud) and 0 < len(cloud) <= LIMITS.max_points
    assert np.isfinite(cloud.coord).all() and cloud.coord.dtype == np.float32


def _fuzz(case: str, examples: int) -> None:
    data, fmt = BASE[case]

    @settings(max_examples=examples, deadline=DEADLINE, database=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(mutated=mutations(data))
    def run(mutated: bytes) -> None:
        decode_or_refuse(mutated, fmt)

    run()


@pytest.mark.parametrize("case", list(BASE))
def test_mutated_files_decode_or_raise_point_cloud_error(case):
    decode_or_refuse(*BASE[case])  # the unmutated file decodes
    _fuzz(case, examples=100)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BASE))
def test_mutated_files_many_more_examples(case):
    _fuzz(case, examples=1500)


@given(data=st.binary(max_size=512), fmt=st.sampled_from(["ply", "las", "laz", "npy", "npz", "pcd", "xyz", "bin"]))
@settings(max_examples=200, deadline=DEADLINE, database=None, derandomize=True)
def test_random_bytes_with_each_magic(data, fmt):
    """Random bodies behind each format's signature (or none)."""
    magic = {"ply": b"ply\n", "las": b"LASF", "laz": b"LASF", "npy": b"\x93NUMPY", "npz": b"PK\x03\x04",
             "pcd": b"VERSION 0.7\n"}.get(fmt, b"")
    decode_or_refuse(magic + data, fmt)


def test_zip_members_lying_about_their_size():
    """An NPZ whose member headers (local and central) declare sizes the data does not have."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("coord.npy", BASE["npy"][0])
    data = bytearray(buffer.getvalue())
    central = data.rfind(b"PK\x01\x02")
    for offset in (22, central + 24):  # local / central uncompressed size
        for size in (0, 10, 2**32 - 1):
            mutated = bytearray(data)
            struct.pack_into("<I", mutated, offset, size)
            decode_or_refuse(bytes(mutated), "npz")


@st.composite
def png_mutations(draw, data: bytes) -> bytes:
    """Byte mutations of a depth PNG, half of them in IHDR (size, bit depth, colour type) with its CRC
    recomputed so that the forged header is believed."""
    out = bytearray(draw(mutations(data)))
    if len(out) >= 33 and draw(st.booleans()):
        struct.pack_into(">II", out, 16, draw(st.integers(0, 2**31 - 1)), draw(st.integers(0, 2**31 - 1)))
        out[24:26] = draw(st.binary(min_size=2, max_size=2))
        struct.pack_into(">I", out, 29, zlib.crc32(bytes(out[12:29])))
    return bytes(out)


DEPTH_PNG = png_bytes(np.arange(64 * 48, dtype=np.uint16).reshape(48, 64))


@given(data=png_mutations(DEPTH_PNG))
@settings(max_examples=200, deadline=DEADLINE, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
def test_mutated_depth_pngs_decode_or_raise_rgbd_error(data):
    """RGB-D input: sized from the PNG header first (as the service does), then decoded; only RGBDError."""
    from service.rgbd import RGBDError, check_image_budget, decode_depth

    def decode() -> None:
        try:
            check_image_budget({"0": data}, {}, LIMITS.max_bytes)
            depth = decode_depth(data, "depth_0")
        except RGBDError as error:
            assert "depth_0" in str(error) or "depth views" in str(error)
        else:
            assert depth.ndim == 2 and depth.size * 320 <= LIMITS.max_bytes

    growth = peak_growth(decode)
    assert growth < MEMORY_BOUND, f"peak RSS grew {growth / MiB:.0f} MiB"

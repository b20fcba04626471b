"""Every reader sizes its allocation from the header and refuses over-limit or impossible headers BEFORE
allocating: each hostile input below is refused with a clear PointCloudError while the process's peak
memory barely moves. The builders are shared with tests/test_service_input_limits.py."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest_service import png_bytes, write_format  # noqa: E402

from model.pointcloud.cloud import PointCloud, PointCloudError, PointCloudTooLarge  # noqa: E402
from model.pointcloud.readers import SUPPORTED_FORMATS, ReadLimits, read_point_cloud  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MiB = 1 << 20
# Peak RSS growth allowed while refusing a hostile input (the inputs themselves are a few MB at most).
SMALL_GROWTH = 64 * MiB


# ------------------------------------------------------------------ hostile inputs (shared with the service test)
def pcd_huge_count() -> bytes:
    """The 132-byte PCD whose COUNT made pypcd4 build 10^11 field names."""
    header = (b"VERSION 0.7\nFIELDS x y z\nSIZE 4 4 4\nTYPE F F F\nCOUNT 1 1 100000000000\nWIDTH 1\nHEIGHT 1\n"
              b"VIEWPOINT 0 0 0 1 0 0 0\nPOINTS 1\nDATA binary\n")
    return header + bytes(132 - len(header))


def ply_header(fmt: str, elements: list[tuple[str, int, list[str]]]) -> bytes:
    lines = ["ply", f"format {fmt} 1.0"]
    for name, count, props in elements:
        lines += [f"element {name} {count}", *props]
    return ("\n".join(lines) + "\nend_header\n").encode()


XYZ_PROPS = ["property float x", "property float y", "property float z"]
FACE_PROPS = ["property list uchar int vertex_indices"]


def ply_list_before_vertex(rows: int = 200_000_000, fmt: str = "binary_little_endian") -> bytes:
    """A ~226-byte PLY whose list element of ``rows`` rows comes before 'vertex' (plyfile preallocates it)."""
    body = bytes(48) if fmt != "ascii" else b"3 0 1 2\n0 0 0\n"
    return ply_header(fmt, [("face", rows, FACE_PROPS), ("vertex", 1, XYZ_PROPS)]) + body


def ply_ascii_huge_vertex() -> bytes:
    return ply_header("ascii", [("vertex", 10**12, XYZ_PROPS)]) + b"0 0 0\n1 1 1\n"


def ply_negative_vertex() -> bytes:
    return ply_header("binary_little_endian", [("vertex", -5, XYZ_PROPS)]) + bytes(60)


def npz_bomb(points: int = 89_000_000) -> bytes:
    """A real (zipfile + numpy header) NPZ of ~4.6 MB whose 'coord' inflates ~230x to points x 12 bytes,
    just under the 256x plausibility bound, so only the point limit / memory budget can refuse it."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        with archive.open("coord.npy", "w", force_zip64=True) as member:
            header = io.BytesIO()
            np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False,
                                                          "shape": (points, 3)})
            member.write(header.getvalue())
            chunk, left = bytes(4 * MiB), points * 12
            while left > 0:
                member.write(chunk[: min(left, len(chunk))])
                left -= len(chunk)
    return buffer.getvalue()


def npy_with_shape(shape_text: str) -> bytes:
    """An NPY header declaring ``shape_text`` followed by 64 bytes of data."""
    buffer = io.BytesIO()
    np.save(buffer, np.zeros((2, 3), np.float32))
    head = buffer.getvalue()[: len(buffer.getvalue()) - 24]
    return head.replace(b"(2, 3)", shape_text.encode().ljust(6)) + bytes(64)


def las_with_count(cloud: PointCloud, tmp: Path, suffix: str, count: int) -> bytes:
    """A LAS/LAZ written by laspy whose header point count is then overwritten (legacy and 1.4 fields)."""
    path = write_format(cloud, tmp / f"scan.{suffix}")
    data = bytearray(path.read_bytes())
    struct.pack_into("<I", data, 107, min(count, 2**32 - 1))  # legacy number of point records (LAS 1.2)
    return bytes(data)


def depth_png(side: int) -> bytes:
    """A constant 16-bit depth image (a few KB of PNG for millions of pixels)."""
    return png_bytes(np.full((side, side), 2000, np.uint16))


def rgbd_cameras(views: int, f: float = 1.0, side: int = 2000) -> str:
    return json.dumps({"views": {str(i): {"fx": f, "fy": f, "cx": side / 2, "cy": side / 2} for i in range(views)}})


# ------------------------------------------------------------------ measuring peak memory of one call
def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def peak_growth(fn) -> int:
    """Peak RSS growth (bytes) while ``fn`` runs: VmHWM is reset to the current RSS first (clear_refs 5)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pytest.skip("cannot reset the peak-RSS counter (/proc/self/clear_refs)")
    before = _status("VmRSS")
    fn()
    return _status("VmHWM") - before


def refused(data: bytes, fmt: str, match: str, limits: ReadLimits | None = None,
            error: type[Exception] = PointCloudError) -> PointCloudError:
    caught: list[PointCloudError] = []

    def read() -> None:
        with pytest.raises(error, match=match) as info:
            read_point_cloud(data, format=fmt, name=f"hostile.{fmt}", limits=limits)
        caught.append(info.value)

    growth = peak_growth(read)
    assert growth < SMALL_GROWTH, f"refusing grew the peak RSS by {growth / MiB:.0f} MiB"
    assert "hostile." in str(caught[0])
    return caught[0]


def small_cloud(n: int = 1000) -> PointCloud:
    rng = np.random.default_rng(3)
    normal = rng.normal(size=(n, 3))
    return PointCloud(coord=rng.uniform(-2, 2, (n, 3)).astype(np.float32),
                      color=rng.integers(0, 256, (n, 3), dtype=np.uint8),
                      normal=(normal / np.linalg.norm(normal, axis=1, keepdims=True)).astype(np.float32))


# ------------------------------------------------------------------ the hostile cases found
def test_pcd_huge_count_is_refused_before_building_the_dtype():
    data = pcd_huge_count()
    assert len(data) == 132
    refused(data, "pcd", "COUNT declares 100000000002 values per point")


@pytest.mark.parametrize("encoding", ["binary", "ascii", "binary_compressed"])
def test_pcd_huge_point_count_is_refused(encoding):
    header = (f"VERSION 0.7\nFIELDS x y z\nSIZE 4 4 4\nTYPE F F F\nCOUNT 1 1 1\nWIDTH 1000000000000\nHEIGHT 1\n"
              f"POINTS 1000000000000\nDATA {encoding}\n").encode()
    body = struct.pack("<II", 16, 12 * 10**12 % 2**32) + bytes(16) if encoding == "binary_compressed" else bytes(64)
    refused(header + body, "pcd", "truncated|compressed block holds")


def test_ply_list_element_before_vertex_is_refused_without_preallocating():
    data = ply_list_before_vertex()
    assert len(data) < 260
    refused(data, "ply", "truncated or its header is wrong")


@pytest.mark.parametrize("make", [ply_ascii_huge_vertex, lambda: ply_list_before_vertex(10**12, "ascii"),
                                  lambda: ply_list_before_vertex(10**12)],
                         ids=["ascii 1e12 vertices", "ascii 1e12 list rows", "binary 1e12 list rows"])
def test_ply_trillion_rows_are_refused(make):
    refused(make(), "ply", "truncated or its header is wrong")


def test_ply_negative_count_is_refused():
    refused(ply_negative_vertex(), "ply", "invalid count -5")


@pytest.fixture(scope="module")
def bomb() -> bytes:
    return npz_bomb()


def test_npz_expanding_230x_is_refused_from_the_member_headers(bomb):
    assert len(bomb) < 6 * MiB
    error = refused(bomb, "npz", "memory budget", error=PointCloudTooLarge)
    assert "GiB" in str(error)
    # With the service's point limit the point count is named instead.
    refused(bomb, "npz", "89000000 points, more than the limit of 5000000", ReadLimits(max_points=5_000_000),
            error=PointCloudTooLarge)


def test_memory_error_from_a_library_becomes_point_cloud_too_large(bomb, tmp_path):
    """With the budget switched off and an address-space cap, numpy's MemoryError surfaces as a clear refusal."""
    path = tmp_path / "bomb.npz"
    path.write_bytes(bomb)
    script = (
        "import resource, sys\n"
        "from model.pointcloud.readers import ReadLimits, read_point_cloud\n"
        "from model.pointcloud.cloud import PointCloudTooLarge\n"
        "size = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmSize:')) * 1024\n"
        "resource.setrlimit(resource.RLIMIT_AS, (size + (512 << 20), size + (512 << 20)))\n"
        "try:\n"
        f"    read_point_cloud({str(path)!r}, limits=ReadLimits(max_points=10**9, max_bytes=10**15))\n"
        "except PointCloudTooLarge as e:\n"
        "    print('REFUSED', e); sys.exit(0)\n"
        "print('READ'); sys.exit(1)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "REFUSED" in result.stdout and "ran out of memory" in result.stdout


@pytest.mark.parametrize("shape, match", [("(1000000000000, 3)", "truncated"), ("(-2, 3)", "invalid shape"),
                                          ("(4294967296, 4294967296, 3)", "truncated")])
def test_npy_impossible_shapes_are_refused(shape, match):
    refused(npy_with_shape(shape), "npy", match)


@pytest.mark.parametrize("suffix, match", [("las", "truncated"), ("laz", "implausibly many|more than the limit")])
def test_las_point_count_beyond_the_bytes_is_refused(suffix, match, tmp_path):
    data = las_with_count(small_cloud(), tmp_path, suffix, 2**32 - 1)
    refused(data, suffix, match)


def test_kitti_and_text_over_the_limits(tmp_path):
    cloud = small_cloud()
    kitti = write_format(cloud, tmp_path / "a.bin").read_bytes()
    refused(kitti, "bin", "1000 points, more than the limit of 999", ReadLimits(max_points=999), PointCloudTooLarge)
    text = write_format(cloud, tmp_path / "a.xyz").read_bytes()
    refused(text, "xyz", "memory budget", ReadLimits(max_bytes=10_000), PointCloudTooLarge)
    refused(b"1 " * 4_000_000 + b"\n", "xyz", "bytes long")


# ------------------------------------------------------------------ every format: exactly at / over the limits
@pytest.mark.parametrize("fmt", [f for f in SUPPORTED_FORMATS if f != "txt"])
def test_every_format_obeys_max_points_and_max_bytes(fmt, tmp_path):
    cloud = small_cloud(1000)
    data = write_format(cloud, tmp_path / f"a.{fmt}").read_bytes()
    assert len(read_point_cloud(data, format=fmt, limits=ReadLimits(max_points=1000))) == 1000
    with pytest.raises(PointCloudTooLarge, match="limit of 999"):
        read_point_cloud(data, format=fmt, limits=ReadLimits(max_points=999))
    with pytest.raises(PointCloudTooLarge, match="memory budget"):
        read_point_cloud(data, format=fmt, limits=ReadLimits(max_bytes=20_000))
    # The default limits leave ordinary files alone (CLI behaviour unchanged).
    assert len(read_point_cloud(data, format=fmt)) == 1000


# ------------------------------------------------------------------ RGB-D: sized from the PNG headers
def test_rgbd_views_over_the_budget_are_refused_before_decoding():
    from service.rgbd import RGBDError, RGBDTooLarge, check_image_budget

    png = depth_png(2000)
    assert len(png) < 16 * 1024
    depth = {str(i): png for i in range(8)}  # 32 M pixels of fx = fy = 1 views

    def check() -> None:
        with pytest.raises(RGBDTooLarge, match="8 depth views of 32000000 pixels"):
            check_image_budget(depth, {}, 2 << 30)

    assert peak_growth(check) < SMALL_GROWTH
    assert check_image_budget({"0": depth_png(100)}, {}, 2 << 30) == 10_000
    with pytest.raises(RGBDTooLarge, match="4000000 pixels in all exceed the limit of 3145728"):
        check_image_budget({"0": png}, {}, 2 << 30, max_pixels=3 << 20)
    with pytest.raises(RGBDError, match="colour image is 100x100 but depth is 2000x2000"):
        check_image_budget({"0": png}, {"0": depth_png(100)}, 2 << 30)


def test_rgbd_fused_points_over_max_points_are_refused_before_normals():
    from service.rgbd import Camera, RGBDTooLarge, RGBDView, fuse_views

    side = 400  # fx = fy = 1: every pixel lands in its own voxel
    K = np.array([[1.0, 0, side / 2], [0, 1.0, side / 2], [0, 0, 1]])
    view = RGBDView(depth=np.full((side, side), 2000, np.uint16), camera=Camera(K=K, camera_to_world=np.eye(4)))
    with pytest.raises(RGBDTooLarge, match="160000 points .* more than the limit of 100000"):
        fuse_views([view], max_points=100_000)
    assert isinstance(RGBDTooLarge("x"), PointCloudTooLarge)


@pytest.mark.parametrize("width, height, match", [(40_000, 40_000, "too large"), (40_000, 10, "40000x10")])
def test_rgbd_image_header_larger_than_allowed_is_refused_without_decoding(width, height, match):
    from service.rgbd import RGBDTooLarge, decode_depth

    png = bytearray(depth_png(8))
    struct.pack_into(">II", png, 16, width, height)  # IHDR width/height, then its CRC
    struct.pack_into(">I", png, 29, zlib.crc32(bytes(png[12:29])))

    def decode() -> None:
        with pytest.raises(RGBDTooLarge, match=match):
            decode_depth(bytes(png), "depth_0")

    assert peak_growth(decode) < SMALL_GROWTH

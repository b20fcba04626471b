"""Decoding real-scan-like inputs: georeferenced float64 coordinates in every format keep millimetres
(one shared shift into ``PointCloud.origin``), values a declared type cannot hold are refused, and every
refusal is one clear PointCloudError naming the file and the problem (no library internals)."""

from __future__ import annotations

import io
import sys
import warnings
import zipfile
from pathlib import Path

import laspy
import numpy as np
import pypcd4
import pytest
from plyfile import PlyData, PlyElement

from model.pointcloud.cloud import PointCloud, PointCloudError, float32_coords
from model.pointcloud.readers import format_from_name, read_point_cloud, write_point_cloud

sys.path.insert(0, str(Path(__file__).parent))

UTM = np.array([500000.0, 4000000.0, 100.0])  # a room in UTM metres, as survey scans come


def room(offset: np.ndarray = UTM, n: int = 2000) -> np.ndarray:
    """(n, 3) float64 points of a 5 m room at ``offset``, rounded to 0.1 mm as scanners report them."""
    return np.round(np.random.default_rng(3).uniform(0, 5, (n, 3)) + offset, 4)


def ply_bytes(xyz: np.ndarray, text: bool, kind: str = "f8") -> bytes:
    rows = np.empty(len(xyz), dtype=[(axis, kind) for axis in "xyz"])
    for i, axis in enumerate("xyz"):
        rows[axis] = xyz[:, i]
    buffer = io.BytesIO()
    PlyData([PlyElement.describe(rows, "vertex")], text=text).write(buffer)
    return buffer.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def npz_bytes(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def pcd_bytes(xyz: np.ndarray, tmp_path: Path, kind=np.float64) -> bytes:
    path = tmp_path / "scan.pcd"
    pypcd4.PointCloud.from_points(xyz.astype(kind), ("x", "y", "z"), (kind,) * 3).save(str(path))
    return path.read_bytes()


def las_bytes(xyz: np.ndarray, tmp_path: Path) -> bytes:
    header = laspy.LasHeader(point_format=0, version="1.2")
    header.scales, header.offsets = np.full(3, 0.0001), np.floor(xyz.min(axis=0))
    las = laspy.LasData(header)
    las.x, las.y, las.z = xyz.T
    las.write(str(tmp_path / "scan.las"))
    return (tmp_path / "scan.las").read_bytes()


def scene_folder(xyz: np.ndarray, tmp_path: Path) -> Path:
    folder = tmp_path / "scene"
    folder.mkdir()
    np.save(folder / "coord.npy", xyz)
    np.save(folder / "color.npy", np.full((len(xyz), 3), 128, np.uint8))
    return folder


def encode(fmt: str, xyz: np.ndarray, tmp_path: Path) -> tuple[bytes | Path, str]:
    """``xyz`` written by the format's own library (numpy, plyfile, pypcd4, laspy), with its file name."""
    if fmt == "ply-double":
        return ply_bytes(xyz, text=False), "scan.ply"
    if fmt == "ply-ascii-double":
        return ply_bytes(xyz, text=True), "scan.ply"
    if fmt == "npy":
        return npy_bytes(xyz), "scan.npy"
    if fmt == "npz":
        return npz_bytes(coord=xyz), "scan.npz"
    if fmt == "xyz":
        buffer = io.BytesIO()
        np.savetxt(buffer, xyz, fmt="%.4f")
        return buffer.getvalue(), "scan.xyz"
    if fmt == "pcd-f8":
        return pcd_bytes(xyz, tmp_path), "scan.pcd"
    if fmt == "las":
        return las_bytes(xyz, tmp_path), "scan.las"
    return scene_folder(xyz, tmp_path), "scene"


FORMATS = ("ply-double", "ply-ascii-double", "npy", "npz", "xyz", "pcd-f8", "las", "scene-folder")


def read(source: bytes | Path, name: str, **kwargs) -> PointCloud:
    return read_point_cloud(source, name=name, **kwargs) if isinstance(source, bytes) else read_point_cloud(source)


# ------------------------------------------------------------------ 1. georeferenced float64 in every format
@pytest.mark.parametrize("fmt", FORMATS)
def test_georeferenced_float64_keeps_millimetres_in_every_format(fmt, tmp_path):
    """float32 at y = 4,000,000 m has 0.25 m steps: casting first left 21 distinct y values in a 5 m room."""
    xyz = room()
    cloud = read(*encode(fmt, xyz, tmp_path))
    np.testing.assert_array_equal(cloud.origin, np.floor(xyz.min(axis=0)))
    assert cloud.coord.dtype == np.float32 and np.abs(cloud.coord).max() < 6
    np.testing.assert_allclose(cloud.coord.astype(np.float64) + cloud.origin, xyz, rtol=0, atol=1e-3)
    np.testing.assert_allclose(cloud.world_coord(), xyz, rtol=0, atol=1e-3)
    assert len(np.unique(cloud.coord[:, 1])) > 0.9 * len(xyz)


@pytest.mark.parametrize("fmt", FORMATS)
def test_ordinary_scans_are_unchanged_bit_for_bit(fmt, tmp_path):
    """A room near zero keeps origin 0 and exactly the float32 cast it always had."""
    xyz = room(offset=np.array([-2.5, 1.0, 0.0]))
    cloud = read(*encode(fmt, xyz, tmp_path))
    assert not cloud.origin.any()
    if fmt == "las":  # laspy stores integers × 0.0001: compare with what it reads back
        xyz = np.stack([np.asarray(getattr(laspy.read(tmp_path / "scan.las"), a)) for a in "xyz"], axis=1)
    np.testing.assert_array_equal(cloud.coord, xyz.astype(np.float32))


def test_float32_input_is_not_shifted_and_threshold_is_float32_millimetres():
    """float32 sources carry no more precision to save; float64 below 2**13 m (sub-mm float32 steps) is cast
    as is, from 2**13 m on it is shifted."""
    small = np.array([[8191.0, 0.0, 0.0], [8190.5, 1.0, 2.0]])
    coord, origin = float32_coords(small, "t")
    assert not origin.any() and coord.dtype == np.float32
    coord, origin = float32_coords(small + [1.0, 0.0, 0.0], "t")
    np.testing.assert_array_equal(origin, [8191.0, 0.0, 0.0])
    coord, origin = float32_coords(room().astype(np.float32), "t")
    assert not origin.any()


def test_nan_holes_do_not_block_the_shift(tmp_path):
    """An organised float64 scan with NaN holes still gets its origin from the finite rows."""
    xyz = room()
    xyz[::7] = np.nan
    xyz[3, 0] = np.inf
    cloud = read_point_cloud(npy_bytes(xyz), name="scan.npy", keep_invalid=True)
    np.testing.assert_array_equal(cloud.origin, np.floor(np.nanmin(np.where(np.isinf(xyz), np.nan, xyz), axis=0)))
    good = np.isfinite(xyz).all(axis=1)
    np.testing.assert_allclose(cloud.world_coord()[good], xyz[good], rtol=0, atol=1e-3)
    assert np.isnan(cloud.coord[::7]).all() and np.isinf(cloud.coord[3, 0])


@pytest.mark.parametrize("keep_invalid", [False, True])
def test_values_beyond_float32_are_not_reported_as_nan(keep_invalid):
    """1e300 is finite: it overflowed the float32 cast and was then called 'NaN or infinite', or dropped."""
    xyz = room(offset=np.zeros(3), n=10)
    xyz[4, 2] = 1e300
    with pytest.raises(PointCloudError, match=r"scan\.npy: coordinates up to 1e\+300 exceed the float32 range.*"
                                              r"first at row 4") as info:
        read_point_cloud(npy_bytes(xyz), name="scan.npy", keep_invalid=keep_invalid)
    assert "NaN" not in str(info.value)


@pytest.mark.parametrize("suffix", [".ply", ".npz", ".xyz"])
def test_written_files_keep_world_coordinates(suffix, tmp_path):
    """write_point_cloud writes coord + origin (float64), so a georeferenced scan round-trips to the mm."""
    xyz = room()
    cloud = read_point_cloud(ply_bytes(xyz, text=False), name="scan.ply")
    path = write_point_cloud(cloud, tmp_path / f"out{suffix}")
    if suffix == ".ply":
        vertex = PlyData.read(str(path))["vertex"]
        written = np.stack([vertex[a] for a in "xyz"], axis=1)
    elif suffix == ".npz":
        written = np.load(path)["coord"]
    else:
        written = np.loadtxt(path)[:, :3]
    assert written.dtype == np.float64
    np.testing.assert_allclose(written, xyz, rtol=0, atol=1e-3)
    again = read_point_cloud(path)
    np.testing.assert_array_equal(again.origin, cloud.origin)
    np.testing.assert_allclose(again.world_coord(), xyz, rtol=0, atol=1e-3)


def test_segment_colored_ply_is_in_world_coordinates(tmp_path, capsys):
    """`ponder segment --colored` adds origin back in float64: a UTM PLY's labelled copy stays within 1 mm."""
    from conftest_service import SPUNET, require_fixtures
    from ponder.cli import main

    require_fixtures()
    xyz = room(n=3000)
    source = tmp_path / "utm.ply"
    source.write_bytes(ply_bytes(xyz, text=False))
    colored = tmp_path / "colored.ply"
    assert main(["segment", str(source), "-o", str(tmp_path / "labels.npz"), "--checkpoint", str(SPUNET),
                 "--colored", str(colored)]) == 0
    vertex = PlyData.read(str(colored))["vertex"]
    written = np.stack([vertex[a] for a in "xyz"], axis=1)
    assert written.dtype == np.float64
    np.testing.assert_allclose(written, xyz, rtol=0, atol=1e-3)


# ------------------------------------------------------------------ 2. ASCII PLY values outside their type
ASCII_HEADER = (b"ply\nformat ascii 1.0\n%selement vertex 3\nproperty float x\nproperty float y\nproperty uchar z\n"
                b"%send_header\n")


@pytest.mark.parametrize("value, problem", [(b"300", "not an integer in 0..255"), (b"-1", "not an integer in 0..255"),
                                            (b"1.5", "not an integer in 0..255")])
def test_ascii_ply_integer_outside_its_type_is_refused(value, problem):
    """np.loadtxt into uint8 wrapped 300 to 44 (and truncated 1.5 to 1) without a word."""
    ply = ASCII_HEADER % (b"", b"") + b"0 0 1\n1 1 " + value + b"\n2 2 2\n"
    with pytest.raises(PointCloudError, match=rf"a\.ply: PLY property 'z' is uchar but line 9 holds "
                                              rf"{value.decode()}, {problem}"):
        read_point_cloud(ply, name="a.ply")


def test_ascii_ply_checks_hold_after_faces_and_beside_list_properties():
    faces_first = (ASCII_HEADER % (b"element face 1\nproperty list uchar int vertex_indices\n", b"")
                   + b"3 0 1 2\n0 0 1\n1 1 300\n2 2 2\n")
    with pytest.raises(PointCloudError, match="'z' is uchar but line 12 holds 300"):
        read_point_cloud(faces_first, name="a.ply")
    with_list = (ASCII_HEADER % (b"", b"property list uchar int idx\nproperty ushort q\n")
                 + b"0 0 1 2 5 -6 7\n1 1 2 1 4 70000\n2 2 3 1 9 8\n")
    with pytest.raises(PointCloudError, match="'q' is ushort but line 11 holds 70000, not an integer in 0..65535"):
        read_point_cloud(with_list, name="a.ply")
    ok = read_point_cloud(with_list.replace(b"70000", b"65535"), name="a.ply")
    np.testing.assert_array_equal(ok.coord[:, 2], [1, 2, 3])
    np.testing.assert_array_equal(ok.extras["q"], [7, 65535, 8])


def test_ascii_ply_in_range_values_decode_as_before():
    ply = ASCII_HEADER % (b"", b"") + b"0.5 -1e-3 0\n1 1 255\n2 2 7.0\n"
    cloud = read_point_cloud(ply, name="a.ply")
    np.testing.assert_array_equal(cloud.coord, np.array([[0.5, -1e-3, 0], [1, 1, 255], [2, 2, 7]], np.float32))


def test_ascii_ply_float_beyond_float32_is_refused():
    ply = ASCII_HEADER.replace(b"uchar", b"float") % (b"", b"") + b"0 0 1\n1 1 1e50\n2 2 nan\n"
    with pytest.raises(PointCloudError, match="'z' is float but line 9 holds 1e\\+50, beyond the float32 range"):
        read_point_cloud(ply, name="a.ply")


# ------------------------------------------------------------------ 3-5. NPZ / PCD consistency
def test_npz_complex_coord_is_refused_like_npy():
    coord = room(offset=np.zeros(3), n=10).astype(np.complex64)
    with pytest.raises(PointCloudError, match="NPY array must be numeric, got dtype complex64"):
        read_point_cloud(npy_bytes(coord), name="a.npy")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no ComplexWarning on the way
        with pytest.raises(PointCloudError, match="NPZ array 'coord' must be numeric .*complex64"):
            read_point_cloud(npz_bytes(coord=coord), name="a.npz")
        with pytest.raises(PointCloudError, match="NPZ array 'color' must be numeric"):
            read_point_cloud(npz_bytes(coord=coord.real, color=coord), name="a.npz")


def test_pcd_width_times_height_must_equal_points():
    header = ("VERSION 0.7\nFIELDS x y z\nSIZE 4 4 4\nTYPE F F F\nCOUNT 1 1 1\nWIDTH 10\nHEIGHT 10\n"
              "VIEWPOINT 0 0 0 1 0 0 0\nPOINTS 200\nDATA binary\n")
    with pytest.raises(PointCloudError, match=r"a\.pcd: not a valid PCD header \(WIDTH 10 \* HEIGHT 10 = 100, "
                                              r"but POINTS is 200\)"):
        read_point_cloud(header.encode() + np.zeros((200, 3), "<f4").tobytes(), name="a.pcd")
    organised = header.replace("POINTS 200", "POINTS 100").encode() + np.zeros((100, 3), "<f4").tobytes()
    assert read_point_cloud(organised, name="a.pcd").grid_shape == (10, 10)


def test_npz_members_that_are_not_arrays_are_ignored():
    buffer = io.BytesIO()
    coord = room(offset=np.zeros(3), n=10)
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("coord.npy", npy_bytes(coord))
        archive.writestr("readme.txt", b"scanned 2024-05-01")
    cloud = read_point_cloud(buffer.getvalue(), name="a.npz")
    np.testing.assert_array_equal(cloud.coord, coord.astype(np.float32))
    assert cloud.extras == {}
    only_text = io.BytesIO()
    with zipfile.ZipFile(only_text, "w") as archive:
        archive.writestr("coord.txt", b"1 2 3")
    with pytest.raises(PointCloudError, match=r"a\.npz: NPZ archive has no 'coord' array \(arrays: none\)"):
        read_point_cloud(only_text.getvalue(), name="a.npz")


# ------------------------------------------------------------------ 6. messages without library internals
@pytest.mark.parametrize("line, expected", [
    ("WIDTH -1", "WIDTH: Input should be greater than or equal to 0 (got -1)"),
    ("DATA foo", "DATA: Input should be 'ascii'"),
])
def test_pcd_header_errors_have_no_pydantic_links(line, expected):
    header = ("VERSION 0.7\nFIELDS x y z\nSIZE 4 4 4\nTYPE F F F\nCOUNT 1 1 1\nWIDTH 1\nHEIGHT 1\n"
              "VIEWPOINT 0 0 0 1 0 0 0\nPOINTS 1\nDATA binary\n")
    key = line.split()[0]
    header = "\n".join(line if row.startswith(key) else row for row in header.splitlines()) + "\n"
    with pytest.raises(PointCloudError) as info:
        read_point_cloud(header.encode() + bytes(12), name="a.pcd")
    assert expected in str(info.value) and "pydantic" not in str(info.value) and "http" not in str(info.value)


def test_npy_header_with_a_call_is_named_not_an_ast_node():
    literal = b"{'descr': '<f8', 'fortran_order': False, 'shape': (__import__('os'),), }"
    literal += b" " * (117 - len(literal)) + b"\n"
    data = b"\x93NUMPY\x01\x00" + len(literal).to_bytes(2, "little") + literal
    with pytest.raises(PointCloudError, match="its header is not a valid NPY header literal") as info:
        read_point_cloud(data, name="a.npy")
    assert "ast." not in str(info.value) and "0x" not in str(info.value)


@pytest.mark.parametrize("body, expected", [
    (b"1 2 3\n4 5 6\n7 8\n", "line 3 has 2 values, the first data row has 3"),
    (b"x y z\n# comment\n1 2 3\n4 5 x\n", "line 4 holds 'x', not a number"),
    (b"1,2,3\n4,5,6,7\n", "line 2 has 4 values, the first data row has 3"),
])
def test_xyz_errors_name_the_line_in_our_words(body, expected):
    with pytest.raises(PointCloudError, match=rf"a\.xyz: not a valid XYZ text table \({expected}\)") as info:
        read_point_cloud(body, name="a.xyz")
    assert "usecols" not in str(info.value)


def test_ply_list_coordinate_is_named_as_a_list_property():
    ply = (b"ply\nformat ascii 1.0\nelement vertex 1\nproperty list uchar float x\nproperty float y\n"
           b"property float z\nend_header\n1 0 0 0\n")
    with pytest.raises(PointCloudError, match="PLY vertex property x is a list property; coordinates must be scalar"):
        read_point_cloud(ply, name="a.ply")


@pytest.mark.parametrize("text", [True, False])
def test_empty_pcd_is_refused_without_a_numpy_warning(text):
    header = ("VERSION 0.7\nFIELDS x y z\nSIZE 4 4 4\nTYPE F F F\nCOUNT 1 1 1\nWIDTH 0\nHEIGHT 1\n"
              f"VIEWPOINT 0 0 0 1 0 0 0\nPOINTS 0\nDATA {'ascii' if text else 'binary'}\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(PointCloudError, match="a.pcd: the point cloud has no points"):
            read_point_cloud(header.encode(), name="a.pcd")


# ------------------------------------------------------------------ 7. formats told from names and content
def test_xyzrgb_text_is_read_as_xyz():
    rows = np.array([[0.0, 1.0, 2.0, 255, 0, 10], [1.0, 2.0, 3.0, 0, 128, 255]])
    buffer = io.BytesIO()
    np.savetxt(buffer, rows, fmt="%.3f %.3f %.3f %d %d %d")
    assert format_from_name("scan.XYZRGB") == "xyz"
    cloud = read_point_cloud(buffer.getvalue(), name="scan.xyzrgb")
    np.testing.assert_array_equal(cloud.color, rows[:, 3:].astype(np.uint8))
    assert len(read_point_cloud(buffer.getvalue(), format="xyzrgb")) == 2


def test_ply_named_like_a_text_table_is_read_as_ply(tmp_path):
    xyz = room(offset=np.zeros(3), n=20)
    data = ply_bytes(xyz, text=True, kind="f4")
    for name in ("scan.xyz", "scan.txt"):
        np.testing.assert_array_equal(read_point_cloud(data, name=name).coord, xyz.astype(np.float32))
    with pytest.raises(PointCloudError, match="looks like a PLY file"):
        read_point_cloud(data, format="xyz", name="scan.xyz")


def test_unknown_and_compressed_names_say_how_to_proceed():
    with pytest.raises(PointCloudError) as info:
        read_point_cloud(b"\x00\x01garbage" * 10, name="scan.e57")
    assert "--format" in str(info.value) and "?format=" in str(info.value) and "pass format=" not in str(info.value)
    with pytest.raises(PointCloudError, match=r"scan\.ply\.gz: the file is gzip-compressed; decompress it first"):
        read_point_cloud(b"\x1f\x8b\x08\x00" + bytes(20), name="scan.ply.gz")
    for named in ({"name": "scan.ply"}, {"format": "ply"}):  # the content tells, whatever the name or format says
        with pytest.raises(PointCloudError, match=r"gzip-compressed; decompress it first"):
            read_point_cloud(b"\x1f\x8b\x08\x00" + bytes(20), **named)

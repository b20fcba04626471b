"""Readers against files written by each format's own library, from a path, from bytes and from a stream;
and every class of bad input refused with PointCloudError naming the problem."""

from __future__ import annotations

import io
from pathlib import Path

import laspy
import numpy as np
import pypcd4
import pytest
from plyfile import PlyData, PlyElement

from model.pointcloud.cloud import PointCloud, PointCloudError
from model.pointcloud.readers import (
    SUPPORTED_FORMATS,
    format_from_name,
    read_point_cloud,
    sniff_format,
    write_point_cloud,
)

N = 400


def make_truth() -> PointCloud:
    rng = np.random.default_rng(7)
    normal = rng.normal(size=(N, 3))
    return PointCloud(
        coord=rng.uniform(-4, 4, (N, 3)).astype(np.float32),
        color=rng.integers(0, 256, (N, 3), dtype=np.uint8),
        normal=(normal / np.linalg.norm(normal, axis=1, keepdims=True)).astype(np.float32),
        extras={"label": rng.integers(0, 20, N).astype(np.int32)},
    )


@pytest.fixture(scope="module")
def truth() -> PointCloud:
    return make_truth()


# ---------------------------------------------------------------- writers using each format's own library
def _ply_records(cloud: PointCloud, names=("x", "y", "z")) -> np.ndarray:
    fields = [(a, "f4") for a in names] + [(c, "u1") for c in ("red", "green", "blue")]
    fields += [(c, "f4") for c in ("nx", "ny", "nz")] + [("label", "i4")]
    records = np.empty(len(cloud), dtype=fields)
    for i, axis in enumerate(names):
        records[axis] = cloud.coord[:, i]
    for i, c in enumerate(("red", "green", "blue")):
        records[c] = cloud.color[:, i]
    for i, c in enumerate(("nx", "ny", "nz")):
        records[c] = cloud.normal[:, i]
    records["label"] = cloud.extras["label"]
    return records


def write_plyfile(cloud: PointCloud, path: Path, text: bool, byte_order: str = "<") -> None:
    faces = np.empty(3, dtype=[("vertex_indices", "i4", (3,))])
    faces["vertex_indices"] = [[0, 1, 2], [1, 2, 3], [2, 3, 4]]
    elements = [PlyElement.describe(_ply_records(cloud), "vertex"), PlyElement.describe(faces, "face")]
    PlyData(elements, text=text, byte_order=byte_order).write(str(path))


def write_laspy(cloud: PointCloud, path: Path) -> None:
    las = laspy.create(point_format=3, file_version="1.2")
    las.header.scales = np.array([0.001, 0.001, 0.001])
    las.header.offsets = np.zeros(3)
    las.x, las.y, las.z = cloud.coord.astype(np.float64).T
    for i, c in enumerate(("red", "green", "blue")):
        las[c] = cloud.color[:, i].astype(np.uint16) * 257  # 16-bit colour
    las.intensity = np.arange(len(cloud), dtype=np.uint16)
    las.classification = (cloud.extras["label"] % 32).astype(np.uint8)
    las.write(str(path))  # .laz suffix → lazrs compression


def write_pypcd4(cloud: PointCloud, path: Path, encoding: pypcd4.Encoding) -> None:
    # pypcd4 prints float fields with %.10f in ASCII, which destroys a float-packed rgb: use uint32 there.
    packed = pypcd4.PointCloud.encode_rgb(cloud.color)
    if encoding == pypcd4.Encoding.ASCII:
        packed = packed.view(np.uint32)
    columns = [*cloud.coord.T, packed, *cloud.normal.T, cloud.extras["label"]]
    fields = ("x", "y", "z", "rgb", "normal_x", "normal_y", "normal_z", "label")
    types = [np.float32] * 3 + [packed.dtype] + [np.float32] * 3 + [np.int32]
    pypcd4.PointCloud.from_points(columns, fields, types).save(path, encoding=encoding)


def write_npy(cloud: PointCloud, path: Path) -> None:
    np.save(path, np.hstack([cloud.coord, cloud.color.astype(np.float32), cloud.normal]))  # (N, 9)


def write_npz(cloud: PointCloud, path: Path) -> None:
    np.savez(path, coord=cloud.coord, color=cloud.color, normal=cloud.normal, segment20=cloud.extras["label"])


def write_text(cloud: PointCloud, path: Path, delimiter: str = " ") -> None:
    table = np.hstack([cloud.coord, cloud.color, cloud.normal]).astype(np.float64)
    np.savetxt(path, table, fmt=["%.9g"] * 3 + ["%d"] * 3 + ["%.9g"] * 3, delimiter=delimiter,
               header="x y z r g b nx ny nz", comments="")
    path.write_text("# exported scan\n" + path.read_text())


def write_kitti(cloud: PointCloud, path: Path) -> None:
    np.hstack([cloud.coord, cloud.extras["label"][:, None].astype(np.float32)]).astype(np.float32).tofile(path)


# name, writer, has colour, has normal, extras expected {name: values-from-truth}
CASES = {
    "binary.ply": (lambda c, p: write_plyfile(c, p, text=False), True, True, "label"),
    "big_endian.ply": (lambda c, p: write_plyfile(c, p, text=False, byte_order=">"), True, True, "label"),
    "ascii.ply": (lambda c, p: write_plyfile(c, p, text=True), True, True, "label"),
    "scan.las": (write_laspy, True, False, None),
    "scan.laz": (write_laspy, True, False, None),
    "ascii.pcd": (lambda c, p: write_pypcd4(c, p, pypcd4.Encoding.ASCII), True, True, "label"),
    "binary.pcd": (lambda c, p: write_pypcd4(c, p, pypcd4.Encoding.BINARY), True, True, "label"),
    "compressed.pcd": (lambda c, p: write_pypcd4(c, p, pypcd4.Encoding.BINARY_COMPRESSED), True, True, "label"),
    "cloud.npy": (write_npy, True, True, None),
    "scene.npz": (write_npz, True, True, "segment20"),
    "points.xyz": (write_text, True, True, None),
    "points.txt": (lambda c, p: write_text(c, p, delimiter=","), True, True, None),
    "velodyne.bin": (write_kitti, False, False, "intensity"),
}


@pytest.fixture(scope="module")
def files(truth: PointCloud, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("clouds")
    for name, (writer, *_rest) in CASES.items():
        writer(truth, root / name)
    return {name: root / name for name in CASES}


@pytest.mark.parametrize("how", ["path", "bytes", "stream"])
@pytest.mark.parametrize("name", list(CASES))
def test_round_trip(name: str, how: str, files: dict[str, Path], truth: PointCloud) -> None:
    _, has_color, has_normal, extra = CASES[name]
    path = files[name]
    if how == "path":
        cloud = read_point_cloud(path)
    elif how == "bytes":
        cloud = read_point_cloud(path.read_bytes(), name=name)
    else:
        with open(path, "rb") as stream:
            cloud = read_point_cloud(stream)
    assert cloud.source.endswith(name)
    assert cloud.coord.dtype == np.float32 and cloud.coord.shape == (N, 3)
    if path.suffix in (".las", ".laz"):  # quantised to the 1 mm scale
        np.testing.assert_allclose(cloud.coord, truth.coord, atol=6e-4)
        assert cloud.extras["intensity"].tolist() == list(range(N))
        np.testing.assert_array_equal(cloud.extras["classification"], truth.extras["label"] % 32)
    else:
        np.testing.assert_array_equal(cloud.coord, truth.coord)
    if has_color:
        np.testing.assert_array_equal(cloud.color, truth.color)
    else:
        assert cloud.color is None
    if has_normal:
        np.testing.assert_allclose(cloud.normal, truth.normal, atol=1e-6)
    else:
        assert cloud.normal is None
    if extra == "intensity":
        np.testing.assert_array_equal(cloud.extras["intensity"], truth.extras["label"].astype(np.float32))
    elif extra is not None:
        np.testing.assert_array_equal(cloud.extras[extra], truth.extras["label"])
        assert cloud.extras[extra].dtype.isnative


@pytest.mark.parametrize("name, fmt", [
    ("binary.ply", "ply"), ("scan.las", "las"), ("scan.laz", "las"), ("binary.pcd", "pcd"),
    ("ascii.pcd", "pcd"), ("cloud.npy", "npy"), ("scene.npz", "npz"),
])
def test_sniffs_format_of_unnamed_bytes(name: str, fmt: str, files: dict[str, Path], truth: PointCloud) -> None:
    data = files[name].read_bytes()
    assert sniff_format(data[:64]) == fmt
    assert len(read_point_cloud(data)) == N


def test_format_names() -> None:
    assert set(SUPPORTED_FORMATS) >= {"ply", "las", "laz", "npy", "npz", "pcd", "xyz", "txt", "bin"}
    assert format_from_name("a/B.PLY") == "ply"
    assert format_from_name(Path("x.laz")) == "laz"
    assert format_from_name("scan.e57") is None and format_from_name(None) is None


@pytest.mark.parametrize("columns", [3, 4, 6])
def test_text_column_layouts(columns: int, truth: PointCloud) -> None:
    table = np.hstack([truth.coord, truth.color / 255.0])[:, :columns] if columns == 6 else None
    if columns == 3:
        table = truth.coord
    if columns == 4:
        table = np.hstack([truth.coord, truth.extras["label"][:, None]])
    buffer = io.BytesIO()
    np.savetxt(buffer, table, fmt="%.9g")
    cloud = read_point_cloud(buffer.getvalue(), format="xyz")
    np.testing.assert_array_equal(cloud.coord, truth.coord)
    if columns == 6:  # colours as 0..1 floats
        np.testing.assert_array_equal(cloud.color, truth.color)
    if columns == 4:
        np.testing.assert_array_equal(cloud.extras["intensity"], truth.extras["label"])


@pytest.mark.parametrize("text", [False, True])
def test_ply_variants_double_coords_16bit_rgb_faces_first(text: bool) -> None:
    """Faces before the vertices (general plyfile path), float64 x/y/z, uint16 r/g/b, an alpha extra."""
    rng = np.random.default_rng(3)
    vertices = np.empty(50, dtype=[("x", "f8"), ("y", "f8"), ("z", "f8"), ("r", "u2"), ("g", "u2"), ("b", "u2"),
                                   ("alpha", "u1")])
    for axis in "xyz":
        vertices[axis] = rng.uniform(-3, 3, 50)
    for channel in "rgb":
        vertices[channel] = rng.integers(0, 256, 50) * 257
    faces = np.empty(2, dtype=[("vertex_indices", "i4", (3,))])
    faces["vertex_indices"] = [[0, 1, 2], [1, 2, 3]]
    buffer = io.BytesIO()
    PlyData([PlyElement.describe(faces, "face"), PlyElement.describe(vertices, "vertex")], text=text).write(buffer)
    cloud = read_point_cloud(buffer.getvalue(), format="ply")
    xyz = np.stack([vertices[a] for a in "xyz"], axis=1).astype(np.float32)
    np.testing.assert_array_equal(cloud.coord, xyz)
    np.testing.assert_array_equal(cloud.color, np.stack([vertices[c] // 257 for c in "rgb"], axis=1))
    assert list(cloud.extras) == ["alpha"]


def test_pcd_separate_rgb_padding_and_multi_count_fields() -> None:
    header = (b"# .PCD v0.7\nVERSION 0.7\nFIELDS x y z _ r g b fpfh\nSIZE 4 4 4 1 1 1 1 4\nTYPE F F F U U U U F\n"
              b"COUNT 1 1 1 3 1 1 1 3\nWIDTH 2\nHEIGHT 1\nVIEWPOINT 0 0 0 1 0 0 0\nPOINTS 2\nDATA binary\n")
    records = np.zeros(2, dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("pad", "u1", (3,)), ("r", "u1"),
                                 ("g", "u1"), ("b", "u1"), ("fpfh", "<f4", (3,))])
    records["x"], records["r"], records["b"] = [1.5, -2.0], [10, 200], [30, 40]
    records["fpfh"] = [[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]]
    cloud = read_point_cloud(header + records.tobytes())
    np.testing.assert_array_equal(cloud.coord[:, 0], [1.5, -2.0])
    np.testing.assert_array_equal(cloud.color, [[10, 0, 30], [200, 0, 40]])
    assert list(cloud.extras) == ["fpfh"]
    np.testing.assert_array_equal(cloud.extras["fpfh"], records["fpfh"])


def test_pcd_ascii_packed_rgb_as_pcl_writes_it() -> None:
    """PCL prints a float ``rgb`` field as its uint32 integer; other tools print the float; trailing spaces occur."""
    header = (b"VERSION 0.7\nFIELDS x y z rgb\nSIZE 4 4 4 4\nTYPE F F F F\nCOUNT 1 1 1 1\nWIDTH 3\nHEIGHT 1\n"
              b"VIEWPOINT 0 0 0 1 0 0 0\nPOINTS 3\nDATA ascii\n")
    packed = np.array([0x0A141E, 0xFF0000, 0x00FF80], dtype=np.uint32)
    as_float = repr(float(packed[2:].view(np.float32)[0])).encode()
    body = b"1 2 3 %d \n4 5 6 %d\n7 8 9 %s\n" % (packed[0], packed[1], as_float)
    cloud = read_point_cloud(header + body, name="pcl.pcd")
    np.testing.assert_array_equal(cloud.color, [[10, 20, 30], [255, 0, 0], [0, 255, 128]])
    np.testing.assert_array_equal(cloud.coord[:, 2], [3, 6, 9])


def test_structured_and_fortran_npy() -> None:
    structured = np.zeros(3, dtype=[("x", "<f8"), ("y", "<f8"), ("z", "<f8"), ("intensity", "<f4")])
    structured["x"], structured["intensity"] = [1, 2, 3], [7, 8, 9]
    cloud = read_point_cloud(_npy_bytes(structured), format="npy")
    np.testing.assert_array_equal(cloud.coord[:, 0], [1, 2, 3])
    np.testing.assert_array_equal(cloud.extras["intensity"], [7, 8, 9])
    fortran = np.asfortranarray(np.arange(12, dtype=np.float32).reshape(4, 3))
    np.testing.assert_array_equal(read_point_cloud(_npy_bytes(fortran)).coord, fortran)


@pytest.mark.parametrize("suffix", [".ply", ".npz", ".xyz"])
def test_write_read_round_trip(suffix: str, truth: PointCloud, tmp_path: Path) -> None:
    cloud = PointCloud(truth.coord, truth.color, truth.normal, dict(truth.extras), "mine")
    path = write_point_cloud(cloud, tmp_path / f"out{suffix}")
    back = read_point_cloud(path)
    np.testing.assert_array_equal(back.coord, truth.coord)
    np.testing.assert_array_equal(back.color, truth.color)
    np.testing.assert_array_equal(back.normal, truth.normal)
    if suffix != ".xyz":
        np.testing.assert_array_equal(back.extras["label"], truth.extras["label"])


def test_write_refuses_unwritable_format(truth: PointCloud, tmp_path: Path) -> None:
    with pytest.raises(PointCloudError, match="cannot write format"):
        write_point_cloud(truth, tmp_path / "out.las")


# ---------------------------------------------------------------- bad input
def _ply_bytes(records: np.ndarray, text: bool = False) -> bytes:
    buffer = io.BytesIO()
    PlyData([PlyElement.describe(records, "vertex")], text=text).write(buffer)
    return buffer.getvalue()


def _npy_bytes(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    return buffer.getvalue()


def _npz_bytes(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _bad_inputs(truth: PointCloud) -> dict[str, tuple[bytes, str, str]]:
    """name → (content, format or file name, expected message fragment)."""
    ply = _ply_bytes(_ply_records(truth))
    ascii_ply = _ply_bytes(_ply_records(truth), text=True)
    nan = truth.coord.copy()
    nan[5, 1] = np.nan
    xyz_inf = b"0 0 0\n1 inf 2\n3 4 5\n"
    obj = np.array([{"x": 1}, None], dtype=object)
    return {
        "empty": (b"", "a.ply", "empty"),
        "garbage ply": (b"\x00\x01garbage" * 10, "a.ply", "not a valid PLY"),
        "garbage unnamed": (b"\x00\x01garbage" * 10, "", "cannot tell the point-cloud format"),
        "ply bad header": (b"ply\nformat binary_little_endian 1.0\nelement vertex 3\nproperty float x\n", "a.ply",
                           "not a valid PLY"),
        "truncated binary ply": (ply[: len(ply) - 50], "a.ply", "truncated"),
        "truncated ascii ply": (b"".join(ascii_ply.splitlines(keepends=True)[:-5]), "a.ply", "truncated"),
        "ascii ply cut mid-row": (ascii_ply[:-30], "a.ply", "not a valid ASCII PLY"),
        "ply without z": (_ply_bytes(_ply_records(truth, names=("x", "y", "w"))), "a.ply", "no z field"),
        "ply zero points": (_ply_bytes(_ply_records(truth)[:0]), "a.ply", "no points"),
        "nan coords": (_npy_bytes(nan), "a.npy", "NaN or infinite"),
        "inf coords": (xyz_inf, "a.xyz", "NaN or infinite"),
        "npy wrong shape": (_npy_bytes(np.zeros((4, 5), np.float32)), "a.npy", "shape"),
        "npy truncated": (_npy_bytes(truth.coord)[:-7], "a.npy", "truncated"),
        "npy pickled objects": (_npy_bytes(obj, allow_pickle=True), "a.npy", "pickled"),
        "npz pickled objects": (_npz_bytes(coord=truth.coord, meta=obj), "a.npz", "pickled"),
        "npz without coord": (_npz_bytes(points=truth.coord), "a.npz", "no 'coord'"),
        "npz mismatched colours": (_npz_bytes(coord=truth.coord, color=truth.color[:-1]), "a.npz", "colours for"),
        "npz garbage": (b"PK\x03\x04" + b"\x00" * 40, "a.npz", "not a valid NPZ"),
        "kitti size": (np.zeros(10, np.float32).tobytes()[:-2], "a.bin", "not a multiple of 16"),
        "las garbage": (b"LASF" + b"\x01" * 50, "a.las", "not a valid LAS"),
        "pcd truncated": (b"VERSION 0.7\nFIELDS x y z\nSIZE 4 4 4\nTYPE F F F\nCOUNT 1 1 1\nWIDTH 3\nHEIGHT 1\n"
                          b"POINTS 3\nDATA binary\n" + b"\x00" * 20, "a.pcd", "truncated"),
        "pcd no data line": (b"VERSION 0.7\nFIELDS x y z\n", "a.pcd", "no DATA line"),
        "xyz five columns": (b"1 2 3 4 5\n", "a.xyz", "5 columns"),
        "xyz no rows": (b"# only a comment\n", "a.xyz", "no data rows"),
    }


BAD_INPUTS = _bad_inputs(make_truth())


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_refused_clearly(case: str) -> None:
    content, name, fragment = BAD_INPUTS[case]
    with pytest.raises(PointCloudError, match=fragment) as error:
        read_point_cloud(content, name=name or None)
    assert (name or "<bytes>") in str(error.value)


def test_truncated_laz_and_las_are_refused(files: dict[str, Path]) -> None:
    for name in ("scan.las", "scan.laz"):
        data = files[name].read_bytes()
        with pytest.raises(PointCloudError, match=name):
            read_point_cloud(data[: len(data) - 60], name=name)


def test_missing_file_and_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(PointCloudError, match="cannot read the file"):
        read_point_cloud(tmp_path / "nope.ply")
    with pytest.raises(PointCloudError, match="unknown point-cloud format"):
        read_point_cloud(b"ply\n", format="obj")


@pytest.mark.parametrize("name", list(CASES))
def test_corrupted_files_raise_only_point_cloud_error(name: str, files: dict[str, Path]) -> None:
    """Truncations and overwritten bytes (header region included) never leak a library exception."""
    data = files[name].read_bytes()
    rng = np.random.default_rng(sum(name.encode()))
    for trial in range(24):
        corrupt = bytearray(data)
        if trial % 2:
            corrupt = corrupt[: rng.integers(0, len(corrupt))]
        else:
            at = int(rng.integers(0, min(len(corrupt), 400)))
            corrupt[at : at + 4] = rng.integers(0, 256, 4, dtype=np.uint8).tobytes()
        try:
            cloud = read_point_cloud(bytes(corrupt), name=name)
        except PointCloudError as error:
            assert name in str(error)
        else:
            assert np.isfinite(cloud.coord).all() and len(cloud) > 0


def test_georeferenced_las_keeps_millimetres(tmp_path):
    """UTM-sized coordinates would lose ~3 cm in float32; the reader moves them near the origin first."""
    import laspy

    xyz = np.array([[512345.123, 5401234.567, 250.001], [512346.456, 5401235.789, 251.234]])
    header = laspy.LasHeader(point_format=3, version="1.2")
    header.offsets, header.scales = xyz.min(0), np.full(3, 0.001)
    las = laspy.LasData(header)
    las.x, las.y, las.z = xyz[:, 0], xyz[:, 1], xyz[:, 2]
    las.write(tmp_path / "survey.las")
    cloud = read_point_cloud(tmp_path / "survey.las")
    np.testing.assert_allclose(cloud.coord.astype(np.float64) + cloud.origin, xyz, atol=1e-3)
    assert np.abs(cloud.coord).max() < 10

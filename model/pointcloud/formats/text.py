"""Plain-text XYZ tables (``.xyz``, ``.xyzrgb``, ``.txt``): one point per row, whitespace- or comma-separated.

Columns by count: 3 = x y z; 4 = x y z intensity; 6 = x y z r g b (0..255 or 0..1);
9 = x y z r g b nx ny nz. Lines starting with ``#`` and one non-numeric header line are skipped.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from model.pointcloud.cloud import PointCloud, PointCloudError, float32_coords
from model.pointcloud.formats.limits import CLOUD_BYTES_PER_POINT, ReadLimits

_COLUMN_COUNTS = (3, 4, 6, 9)
# A data row holds at most 9 numbers; a longer first line is not a table (and is not split into tokens).
_MAX_ROW_BYTES = 4096


def read_xyz(data: bytes, source: str, limits: ReadLimits) -> PointCloud:
    skip, delimiter, columns = _layout(data, source)
    # Every line may be a row: the float64 table (grown, so up to twice) plus the decoded cloud.
    rows = data.count(b"\n") + 1 - skip
    limits.check_bytes(source, f"an XYZ table of up to {rows} rows", rows * (16 * columns + CLOUD_BYTES_PER_POINT))
    text = io.TextIOWrapper(io.BytesIO(data), encoding="utf-8")
    try:
        table = np.loadtxt(text, dtype=np.float64, comments="#", delimiter=delimiter, skiprows=skip, ndmin=2)
    except UnicodeDecodeError as exc:
        raise PointCloudError(f"{source}: not a valid XYZ text table (not UTF-8 text)") from exc
    except ValueError as exc:  # numpy's text advises `usecols`: name the line and the problem instead
        problem = _bad_line(data, skip, delimiter, columns)
        raise PointCloudError(f"{source}: not a valid XYZ text table ({problem})") from exc
    columns = table.shape[1]
    if columns not in _COLUMN_COUNTS:
        raise PointCloudError(
            f"{source}: XYZ table has {columns} columns; expected 3 (xyz), 4 (xyz intensity), "
            "6 (xyz rgb) or 9 (xyz rgb normal)"
        )
    coord, origin = float32_coords(table[:, 0:3], source)
    return PointCloud(
        coord=coord,
        origin=origin,
        color=table[:, 3:6] if columns >= 6 else None,
        normal=table[:, 6:9] if columns == 9 else None,
        extras={"intensity": table[:, 3].astype(np.float32)} if columns == 4 else {},
        source=source,
    )


def write_xyz(cloud: PointCloud, path: Path) -> None:
    """x y z [r g b [nx ny nz]], with enough digits to round-trip the coordinates exactly (float32, or float64
    world coordinates of a georeferenced cloud)."""
    if cloud.normal is not None and cloud.color is None:
        raise PointCloudError(f"{cloud.source}: XYZ text can hold normals only together with colours")
    coord = cloud.world_coord()
    parts, formats = [coord.astype(np.float64)], ["%.17g" if coord.dtype == np.float64 else "%.9g"] * 3
    if cloud.color is not None:
        parts.append(cloud.color.astype(np.float64))
        formats += ["%d"] * 3
    if cloud.normal is not None:
        parts.append(cloud.normal.astype(np.float64))
        formats += ["%.9g"] * 3
    np.savetxt(path, np.hstack(parts), fmt=formats, delimiter=" ")


def _layout(data: bytes, source: str) -> tuple[int, str | None, int]:
    """(lines before the first data row, its delimiter, its column count); comments and one header
    line are skipped."""
    seen_header = False
    for index, raw in enumerate(io.BytesIO(data)):
        line = raw.strip()
        if not line or line.startswith(b"#"):
            continue
        if len(line) > _MAX_ROW_BYTES:
            raise PointCloudError(
                f"{source}: not a valid XYZ text table (line {index + 1} is {len(line)} bytes long; "
                "a row holds 3 to 9 numbers)"
            )
        delimiter = "," if b"," in line else None
        try:
            values = [float(token) for token in line.decode("utf-8").split(delimiter)]
        except UnicodeDecodeError as exc:
            raise PointCloudError(f"{source}: not a valid XYZ text table (not UTF-8 text)") from exc
        except ValueError as exc:
            if seen_header:
                raise PointCloudError(
                    f"{source}: not a valid XYZ text table (line {index + 1} is not numeric: {line[:60]!r})"
                ) from exc
            if line == b"ply":
                raise PointCloudError(f"{source}: the content looks like a PLY file (first line 'ply'), "
                                      "not an XYZ text table; read it as PLY") from exc
            seen_header = True  # a header line such as "x y z r g b"
            continue
        return index, delimiter, len(values)
    raise PointCloudError(f"{source}: XYZ text has no data rows")


def _bad_line(data: bytes, skip: int, delimiter: str | None, columns: int) -> str:
    """Why the table did not parse, for the first offending line (1-based), found by re-reading the text;
    only called after ``np.loadtxt`` failed, so its cost does not matter."""
    for index, raw in enumerate(io.BytesIO(data)):
        line = raw.split(b"#", 1)[0].strip()
        if index < skip or not line:
            continue
        tokens = line.decode("utf-8", "replace").split(delimiter)
        if len(tokens) != columns:
            return f"line {index + 1} has {len(tokens)} values, the first data row has {columns}"
        for token in tokens:
            try:
                float(token)
            except ValueError:
                return f"line {index + 1} holds {token.strip()[:40]!r}, not a number"
    return "a row could not be read as numbers"

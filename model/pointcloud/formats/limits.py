"""The memory budget every reader checks against the header BEFORE it allocates.

A reader sizes what it is about to decode from the header alone (point count × record size, image
size, npy shapes), then asks :class:`ReadLimits` whether that fits; a forged header must cost a few
bytes of parsing, never the gigabytes it declares. The estimates are deliberately generous upper
bounds of the reader's own arrays plus the :class:`PointCloud` it builds from them.
"""

from __future__ import annotations

from dataclasses import dataclass

from model.pointcloud.cloud import PointCloudError, PointCloudTooLarge

# Bytes per point of the decoded PointCloud and its validation temporaries: coord float32 (12),
# colour uint8 (3), normal float32 (12), isfinite masks (4), rounded with room for colour scaling.
CLOUD_BYTES_PER_POINT = 64


@dataclass(frozen=True)
class ReadLimits:
    """max_points: most points one input may hold; max_bytes: memory budget for the decoded arrays
    of one input (the default leaves ample room on a 24 GB machine)."""

    max_points: int = 100_000_000
    max_bytes: int = 2 << 30

    def check_points(self, source: str, what: str, count: int) -> None:
        """Refuse a negative or too-large declared point count."""
        require_count(source, what, count)
        if count > self.max_points:
            raise PointCloudTooLarge(
                f"{source}: {what} declares {count} points, more than the limit of {self.max_points}"
            )

    def check_bytes(self, source: str, what: str, needed: int) -> None:
        """Refuse a decode whose estimated allocation exceeds the memory budget."""
        if needed > self.max_bytes:
            raise PointCloudTooLarge(
                f"{source}: decoding {what} would need about {_human(needed)}, more than the "
                f"memory budget of {_human(self.max_bytes)} per input"
            )

    def check(self, source: str, what: str, count: int, bytes_per_point: int, fixed: int = 0) -> None:
        """Both checks for ``count`` points costing ``bytes_per_point`` each (plus the decoded cloud)."""
        self.check_points(source, what, count)
        self.check_bytes(source, what, count * (bytes_per_point + CLOUD_BYTES_PER_POINT) + fixed)


DEFAULT_LIMITS = ReadLimits()


def require_count(source: str, what: str, count: int) -> None:
    """A declared count must be a non-negative integer."""
    if not isinstance(count, int) or count < 0:
        raise PointCloudError(f"{source}: {what} declares an invalid count {count!r} (must be 0 or more)")


def require_bytes(source: str, what: str, needed: int, available: int) -> None:
    """The declared data must fit in the bytes that follow the header."""
    if needed > available:
        raise PointCloudError(
            f"{source}: {what} is truncated or its header is wrong: the header needs at least {needed} "
            f"bytes of data but only {max(available, 0)} bytes follow"
        )


def _human(n: int) -> str:
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} bytes"

"""One module per point-cloud file format. Each reader takes the whole file as ``bytes`` plus a
source name for messages and returns an unvalidated :class:`~model.pointcloud.cloud.PointCloud`;
:mod:`model.pointcloud.readers` picks the reader, wraps library errors and validates."""

# A compressed container (LAZ, NPZ, binary_compressed PCD) whose header claims more than this many
# times its own size in decoded bytes is refused before anything is allocated: real scans compress
# 2-10x, so only a forged or corrupt header gets near it (a 1 KB file must not allocate gigabytes).
MAX_EXPANSION = 256

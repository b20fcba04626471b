"""Point-cloud input: decoding, normals, voxelisation."""

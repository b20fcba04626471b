"""The one error type of the image branch: a multi-view image input that cannot be lifted."""

from __future__ import annotations


class ImageInputError(ValueError):
    """Posed images that cannot be used: a view without a pose or with a non-rigid one, an image whose size
    disagrees with its intrinsics, fewer than two views, or views that see nothing of the scene volume. A
    ``ValueError``, so the CLI answers exit code 2 and a service would answer 4xx."""

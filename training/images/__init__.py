"""Rendering pre-training of the image model (``model.images``): RGB of some views in, held-out views rendered."""

"""Rendered views as image files: 8-bit RGB colour PNG, 16-bit depth PNG in millimetres (0 = the ray missed the
scene box, clipped at 65.535 m, as RGB-D inputs use) and float32 depth in metres as .npy.

One encoder for ``ponder render`` (files in a folder) and ``POST /v1/render`` (a PNG or a zip), so both hand
out the same bytes for the same view.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from model.render.views import RenderedView

DEPTH_UNITS_PER_M = 1000  # 16-bit depth PNGs hold millimetres


@dataclass
class ViewImages:
    """One camera's render as numpy arrays (tensors stay on the thread that made them)."""

    color: np.ndarray  # (H, W, 3) uint8
    depth: np.ndarray  # (H, W) float32 z-depth in metres, 0 where the ray misses the scene box
    hit_fraction: float

    @classmethod
    def of(cls, view: RenderedView) -> "ViewImages":
        color = np.clip(np.rint(view.rgb.detach().cpu().numpy() * 255), 0, 255).astype(np.uint8)
        return cls(color=color, depth=view.depth.detach().cpu().numpy().astype(np.float32),
                   hit_fraction=float(view.hit.float().mean()))

    def depth_units(self) -> np.ndarray:
        """(H, W) uint16 millimetres, clipped to 65.535 m."""
        return np.clip(np.rint(self.depth * DEPTH_UNITS_PER_M), 0, 65535).astype(np.uint16)

    def files(self, index: int) -> dict[str, bytes]:
        """``<i>_color.png``, ``<i>_depth.png`` and ``<i>_depth.npy`` as bytes, by file name."""
        return {f"{index}_color.png": png_bytes(self.color), f"{index}_depth.png": png_bytes(self.depth_units()),
                f"{index}_depth.npy": npy_bytes(self.depth)}

    def write(self, folder: Path, index: int) -> list[Path]:
        """The view's files in ``folder``, each written beside its name and renamed (never half a file)."""
        from model.files import replaced_on_success

        paths = []
        for name, data in self.files(index).items():
            with replaced_on_success(folder / name) as tmp:
                tmp.write_bytes(data)
            paths.append(folder / name)
        return paths


def png_bytes(image: np.ndarray) -> bytes:
    """uint8 (H, W, 3) -> RGB PNG; uint16 (H, W) -> 16-bit greyscale PNG."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()

"""Evidence maps laid over the picture the model saw, at the sizes the page and the figure show."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from ..colors import colorize, normalize
from ..explanation import Explanation, upsample

GREY = 128  # canvas value when the explanation carries no picture
ALPHA = 0.6  # peak opacity of the overlays in reports


def as_rgb(picture: np.ndarray) -> np.ndarray:
    """Coerce greyscale, RGBA or float pictures to (H, W, 3) uint8, the only form we blend."""
    picture = np.asarray(picture)
    if picture.ndim == 2:
        picture = np.repeat(picture[..., None], 3, axis=2)
    if picture.ndim != 3 or picture.shape[2] not in (1, 3, 4):
        raise ValueError(f"picture must be (H, W), (H, W, 3) or (H, W, 4), got {picture.shape}")
    if picture.shape[2] == 1:
        picture = np.repeat(picture, 3, axis=2)
    picture = picture[..., :3]
    if picture.dtype != np.uint8:
        scale = 255.0 if np.issubdtype(picture.dtype, np.floating) and picture.max(initial=0) <= 1.0 else 1.0
        picture = np.clip(np.nan_to_num(picture.astype(np.float32) * scale), 0, 255).astype(np.uint8)
    return picture


def heatmap_overlay(picture: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Lay ``heat`` over ``picture`` in the project's colours; returns (H, W, 3) uint8.

    ``heat`` is normalised by its maximum and resized (bilinear) to the picture when its
    resolution differs. The opacity of each pixel is ``alpha * sqrt(heat)`` rather than a
    constant: where a channel has no evidence (heat == 0) the picture is left exactly as it was,
    so the eye reads "coloured = evidence here" and the page content stays visible elsewhere.
    The square root keeps weak but non-zero evidence visible.
    """
    rgb = as_rgb(picture)
    heat = np.asarray(heat, dtype=np.float32)
    if heat.ndim != 2:
        heat = heat.reshape(heat.shape[-2:])
    if heat.shape != rgb.shape[:2]:
        heat = upsample(heat, rgb.shape[:2])
    heat = normalize(heat)
    opacity = (float(alpha) * np.sqrt(heat))[..., None]
    blended = rgb.astype(np.float32) * (1.0 - opacity) + colorize(heat) * opacity
    out = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    out[heat <= 0] = rgb[heat <= 0]  # exact, not merely within rounding
    return out


def stretch(heat: np.ndarray) -> np.ndarray:
    """Shift a whole-layer map so its minimum is zero.

    Decision-level maps (the gAP root map, Grad-CAM, LayerCAM) of classifiers with a global
    pooling head are positive almost everywhere and vary by a few percent; shown as they are,
    they look uniformly hot. Per-channel node maps keep their zeros, which mean "no evidence".
    """
    heat = np.asarray(heat, dtype=np.float32)
    return heat - float(heat.min()) if heat.size else heat


def picture_of(explanation: Explanation) -> np.ndarray:
    """The picture the model saw, or a neutral grey canvas of the input size when unknown."""
    if explanation.picture is not None:
        return as_rgb(explanation.picture)
    height, width = explanation.input_hw
    return np.full((int(height), int(width), 3), GREY, dtype=np.uint8)


def fit_size(hw: Sequence[int], base: int, max_ratio: float = 2.0) -> tuple[int, int]:
    """(height, width) with about ``base**2`` pixels and the input's aspect ratio.

    Equal area keeps square inputs at ``base`` and stops wide text-line inputs (48x320) from
    becoming slivers; the longer side is capped at ``max_ratio * base`` so they still fit a row.
    """
    height, width = max(int(hw[0]), 1), max(int(hw[1]), 1)
    aspect = width / height
    out_w, out_h = base * aspect**0.5, base / aspect**0.5
    cap = max_ratio * base
    shrink = min(1.0, cap / max(out_w, out_h))
    return max(int(round(out_h * shrink)), 1), max(int(round(out_w * shrink)), 1)


def resize(rgb: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 at ``hw`` (Lanczos: thumbnails and atlas patches are downscaled)."""
    if rgb.shape[:2] == tuple(hw):
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((hw[1], hw[0]), Image.Resampling.LANCZOS))


class Thumbnails:
    """Overlays of many maps on one picture at one size, downscaling the picture only once.

    Maps are upsampled straight from layer resolution to the thumbnail size, which is what
    upsampling to the input and then shrinking would give, at a fraction of the cost.
    """

    def __init__(self, picture: np.ndarray, hw: tuple[int, int]) -> None:
        self.hw = hw
        self.base = resize(picture, hw)

    def overlay(self, heat: np.ndarray) -> np.ndarray:
        heat = np.asarray(heat, dtype=np.float32)
        heat = heat.reshape(heat.shape[-2:]) if heat.ndim != 2 else heat
        return heatmap_overlay(self.base, upsample(heat, self.hw), alpha=ALPHA)

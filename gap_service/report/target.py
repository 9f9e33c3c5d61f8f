"""The explained target drawn on the input: a detection's box or a region's outline, with its label,
so that a reader sees which decision the tree decomposes (a class needs no drawing)."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from ..explanation import Explanation, upsample

OUTLINE = (220, 38, 38)  # the target's colour: red, apart from the heatmaps' blues and yellows
TEXT = (255, 255, 255)


def draw_target(picture: np.ndarray, explanation: Explanation) -> np.ndarray:
    """``picture`` (any size of the input the model saw, RGB uint8) with the target drawn on it."""
    explained = explanation.explained
    if explained is None or explained.kind not in ("detection", "region"):
        return picture
    height, width = picture.shape[:2]
    source = explanation.input_hw if explained.kind == "detection" else explained.map_hw or explanation.input_hw
    scale_y, scale_x = height / source[0], width / source[1]
    image = Image.fromarray(np.ascontiguousarray(picture))
    draw = ImageDraw.Draw(image)
    line = max(2, round(min(height, width) / 120))
    top_left = (0.0, 0.0)
    if explained.box is not None:
        x1, y1, x2, y2 = explained.box
        top_left = (x1 * scale_x, y1 * scale_y)
        draw.rectangle([x1 * scale_x, y1 * scale_y, x2 * scale_x - 1, y2 * scale_y - 1], outline=OUTLINE, width=line)
    elif explained.mask is not None:
        edge = _outline(explained.mask, (height, width), line)
        pixels = np.asarray(image).copy()
        pixels[edge] = OUTLINE
        image = Image.fromarray(pixels)
        draw = ImageDraw.Draw(image)
        rows, columns = np.nonzero(edge)
        top_left = (float(columns.min()), float(rows.min())) if rows.size else top_left
    else:
        return picture  # the whole map: nothing to single out
    _label(draw, _caption(explanation), top_left, (width, height))
    return np.asarray(image)


def _caption(explanation: Explanation) -> str:
    name = explanation.label if explanation.label is not None else f"class {explanation.target}"
    return f"{name} {explanation.probability:.2f}" if explanation.probability is not None else name


def _outline(mask: np.ndarray, hw: tuple[int, int], width: int) -> np.ndarray:
    """The border pixels, ``width`` thick, of the mask's non-zero region stretched to ``hw``."""
    inside = upsample(np.asarray(mask, np.float32) != 0, hw) > 0.5
    inner = inside.copy()
    for _ in range(width):
        shrunk = inner.copy()
        shrunk[1:] &= inner[:-1]
        shrunk[:-1] &= inner[1:]
        shrunk[:, 1:] &= inner[:, :-1]
        shrunk[:, :-1] &= inner[:, 1:]
        inner = shrunk
    return inside & ~inner


def _label(draw: ImageDraw.ImageDraw, text: str, corner: tuple[float, float], size: tuple[int, int]) -> None:
    """``text`` on a filled tab just above ``corner`` (below it when there is no room), kept inside the picture."""
    left, top, right, bottom = draw.textbbox((0, 0), text)
    text_w, text_h = right - left + 6, bottom - top + 4
    x = min(max(corner[0], 0), max(size[0] - text_w, 0))
    y = corner[1] - text_h if corner[1] - text_h >= 0 else corner[1]
    draw.rectangle([x, y, x + text_w, y + text_h], fill=OUTLINE)
    draw.text((x + 3 - left, y + 2 - top), text, fill=TEXT)


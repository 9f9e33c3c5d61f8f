"""The PNG figure: the top levels of the tree laid out the way the paper's figures are.

Input and root heatmap on top, then one row per level with each node under its parent. Drawn
with Pillow only, so a figure can be made wherever an explanation can be computed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..colors import png_bytes
from ..explanation import Explanation, Node
from .labels import decision_text, format_number, format_share, level_colour
from .overlay import Thumbnails, fit_size, picture_of, stretch
from .target import draw_target

_INK = (15, 23, 42)
_MUTED = (100, 116, 139)
_LINE = (148, 163, 184)
_PAPER = (255, 255, 255)
MAX_FIGURE_WIDTH = 4000  # px the deepest row aims for before thumbnails shrink (not below MIN_THUMB)
MIN_THUMB = 56
MAX_CANVAS_WIDTH = 16000  # px; wider trees lose their deepest rows
TOP_THUMB = 192
LABEL_COLUMN = 190


@lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's bundled font at ``size``; the fixed bitmap font on Pillow builds without FreeType."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def _printable(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> str:
    """The bitmap fallback font only encodes Latin-1: replace what it cannot draw."""
    if isinstance(font, ImageFont.FreeTypeFont):
        return text
    return text.replace("\u2026", "...").encode("latin-1", "replace").decode("latin-1")


def _fit_text(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, width: float) -> str:
    """Truncate with an ellipsis so labels never run into their neighbours."""
    text = _printable(text, font)
    if draw.textlength(text, font=font) <= width:
        return text
    ellipsis = _printable("\u2026", font)
    while text and draw.textlength(text + ellipsis, font=font) > width:
        text = text[:-1]
    return text + ellipsis


@dataclass
class _Box:
    """Where one node's thumbnail goes in the figure."""

    node: Node
    x: float  # centre
    y: float  # top
    hw: tuple[int, int]


def _level_thumb(count: int, level: int) -> int:
    """Thumbnail side for a row of ``count`` nodes: smaller when the row is crowded."""
    if level <= 1:
        return 128
    return int(max(MIN_THUMB, min(128, MAX_FIGURE_WIDTH // max(count, 1) - 16)))


def _caption_height(side: int) -> int:
    return 2 * (_caption_font_size(side) + 4) + 4


def _caption_font_size(side: int) -> int:
    return max(10, min(14, side // 9))


def _layout(explanation: Explanation, levels: int, sizes: dict[int, tuple[int, int]]) -> tuple[list[_Box], float]:
    """Tidy-tree placement: each subtree gets max(own width, children's widths) and is centred.

    Returns the boxes (x relative to the tree's left edge) and the tree's width.
    """
    nodes = explanation.nodes
    widths: dict[int, float] = {}

    def gap(level: int) -> float:
        return 10.0 if level >= levels else 26.0

    def kids(node: Node) -> list[Node]:
        return [nodes[c] for c in node.children] if node.level < levels else []

    def measure(node: Node) -> float:
        own = sizes[node.level][1] + 8.0
        children = kids(node)
        span = sum(measure(c) for c in children) + gap(node.level + 1) * max(len(children) - 1, 0)
        widths[node.id] = max(own, span)
        return widths[node.id]

    boxes: list[_Box] = []

    def place(node: Node, left: float, row_tops: dict[int, float]) -> None:
        boxes.append(_Box(node, left + widths[node.id] / 2, row_tops[node.level], sizes[node.level]))
        children = kids(node)
        span = sum(widths[c.id] for c in children) + gap(node.level + 1) * max(len(children) - 1, 0)
        cursor = left + (widths[node.id] - span) / 2
        for child in children:
            place(child, cursor, row_tops)
            cursor += widths[child.id] + gap(node.level + 1)

    total = measure(explanation.root)
    row_tops, y = {}, 0.0
    for level in range(levels + 1):
        row_tops[level] = y
        y += sizes[level][0] + _caption_height(sizes[level][0]) + 44
    place(explanation.root, 0.0, row_tops)
    return boxes, total


def _draw_connectors(draw: ImageDraw.ImageDraw, boxes: list[_Box], offset: tuple[float, float]) -> None:
    """Elbow lines from each parent's caption down to a bus over its children, then to each child."""
    by_id = {b.node.id: b for b in boxes}
    for box in boxes:
        children = [by_id[c] for c in box.node.children if c in by_id]
        if not children:
            continue
        ox, oy = offset
        top = oy + box.y + box.hw[0] + _caption_height(box.hw[0]) + 4
        child_top = oy + children[0].y - 4
        bus = (top + child_top) / 2
        xs = [ox + c.x for c in children]
        draw.line([(ox + box.x, top), (ox + box.x, bus)], fill=_LINE, width=2)
        draw.line([(min(xs + [ox + box.x]), bus), (max(xs + [ox + box.x]), bus)], fill=_LINE, width=2)
        for x in xs:
            draw.line([(x, bus), (x, child_top)], fill=_LINE, width=2)


def _draw_thumb(canvas: Image.Image, draw: ImageDraw.ImageDraw, image: np.ndarray, x: float, y: float,
                lines: Iterable[tuple[str, tuple[int, int, int], bool]], font_size: int) -> None:
    """Paste an image centred on ``x`` with a thin frame, and centred caption lines under it."""
    height, width = image.shape[:2]
    left = int(round(x - width / 2))
    top = int(round(y))
    canvas.paste(Image.fromarray(image), (left, top))
    draw.rectangle([left - 1, top - 1, left + width, top + height], outline=(203, 213, 225))
    line_y = top + height + 5
    for text, colour, bold in lines:
        font = _font(font_size + (1 if bold else 0))
        text = _fit_text(draw, text, font, max(width + 6, 40))
        # centred by measuring, not anchor="ma": Pillow's bitmap fallback font has no anchors
        draw.text((x - draw.textlength(text, font=font) / 2, line_y), text, fill=colour, font=font)
        line_y += font_size + 4


def _header_lines(explanation: Explanation, note: str = "") -> list[tuple[str, int, tuple[int, int, int]]]:
    probability = "" if explanation.probability is None else f" \u00b7 p {explanation.probability:.3f}"
    lines = [
        (f"gAP decomposition: {explanation.model}", 22, _INK),
        (f"target {decision_text(explanation)} \u00b7 logit {format_number(explanation.logit)}{probability}"
         f" \u00b7 score mode {explanation.score_mode}", 15, _MUTED),
    ]
    return lines + ([(note, 13, (154, 52, 18))] if note else [])


def _row_sizes(explanation: Explanation, hw: Sequence[int], levels: int) -> dict[int, tuple[int, int]]:
    """Thumbnail (height, width) per level: large on top, shrinking in crowded rows."""
    sizes = {0: fit_size(hw, TOP_THUMB)}
    for level in range(1, levels + 1):
        sizes[level] = fit_size(hw, _level_thumb(len(explanation.level(level)), level))
    return sizes


def _fitting_levels(explanation: Explanation, hw: Sequence[int], levels: int) -> int:
    """The most levels (up to ``levels``) whose figure stays under MAX_CANVAS_WIDTH pixels.

    A wide tree (top_k 64) would otherwise ask Pillow for a canvas of hundreds of thousands of
    pixels; dropping the deepest rows keeps the figure useful instead of failing.
    """
    while levels > 1 and _layout(explanation, levels, _row_sizes(explanation, hw, levels))[1] > MAX_CANVAS_WIDTH:
        levels -= 1
    return levels


def render_png(explanation: Explanation, levels: int = 2, path: str | Path | None = None) -> bytes:
    """A paper-style figure of the top ``levels`` levels of the tree, as PNG bytes.

    Input and root heatmap on top, then one row per level with each node under its parent,
    captioned with its channel and share. Rows shrink their thumbnails when crowded so a
    depth-3 tree stays a manageable image. Written to ``path`` too when given.
    """
    picture = picture_of(explanation)
    wanted = max(0, min(int(levels), explanation.depth))
    levels = _fitting_levels(explanation, picture.shape[:2], wanted)
    note = f"showing {levels} of {wanted} levels: deeper rows would make the figure too wide" if levels < wanted else ""
    sizes = _row_sizes(explanation, picture.shape[:2], levels)
    boxes, tree_width = _layout(explanation, levels, sizes)
    header_lines = _header_lines(explanation, note)

    margin = 28
    header = margin + sum(size + 10 for _, size, _ in header_lines) + 12
    root_w = sizes[0][1]
    # the input sits left of the root (centred over the tree), inside the label column if it fits
    left = margin + max(LABEL_COLUMN, 1.5 * root_w + 40 - tree_width / 2)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_width = max(probe.textlength(_printable(text, _font(size)), font=_font(size)) for text, size, _ in header_lines)
    width = int(max(left + max(tree_width, root_w + 16), margin + min(text_width, 1600)) + margin)
    height = int(header + max(b.y + b.hw[0] + _caption_height(b.hw[0]) for b in boxes) + margin)
    canvas = Image.new("RGB", (width, height), _PAPER)
    draw = ImageDraw.Draw(canvas)

    y = margin - 6
    for text, size, colour in header_lines:
        draw.text((margin, y), _fit_text(draw, text, _font(size), width - 2 * margin), fill=colour, font=_font(size))
        y += size + 10
    _draw_connectors(draw, boxes, (left, header))
    _draw_nodes(canvas, draw, picture, boxes, sizes, (left, header), explanation)
    _draw_level_labels(draw, explanation, boxes, levels, header, margin)
    data = png_bytes(np.asarray(canvas))
    if path is not None:
        Path(path).write_bytes(data)
    return data


def _draw_nodes(canvas: Image.Image, draw: ImageDraw.ImageDraw, picture: np.ndarray, boxes: list[_Box],
                sizes: dict[int, tuple[int, int]], offset: tuple[float, float], explanation: Explanation) -> None:
    """Every node's overlay with its caption, and the input picture (with the target drawn) left of the root."""
    left, top = offset
    thumbs = {level: Thumbnails(picture, hw) for level, hw in sizes.items()}
    for box in boxes:
        node = box.node
        if node.parent is None:
            caption = [("decision (gAP)", _INK, True),
                       (f"class {node.channel} \u00b7 logit {format_number(node.score)}", _MUTED, False)]
        else:
            caption = [(f"ch {node.channel}", _INK, True), (format_share(node.share), _MUTED, False)]
        heat = stretch(node.map) if node.parent is None else node.map
        _draw_thumb(canvas, draw, thumbs[node.level].overlay(heat), left + box.x, top + box.y, caption,
                    _caption_font_size(min(box.hw)))

    root, (root_h, root_w) = boxes[0], sizes[0]
    input_x = left + root.x - root_w - 40
    _draw_thumb(canvas, draw, draw_target(thumbs[0].base, explanation), input_x, top + root.y,
                [("input", _INK, True), (f"{picture.shape[0]}x{picture.shape[1]}", _MUTED, False)],
                _caption_font_size(min(sizes[0])))
    arrow_y = top + root.y + root_h / 2
    draw.line([(input_x + root_w / 2 + 8, arrow_y), (left + root.x - root_w / 2 - 10, arrow_y)], fill=_LINE, width=2)


def _draw_level_labels(draw: ImageDraw.ImageDraw, explanation: Explanation, boxes: list[_Box], levels: int,
                       header: float, margin: int) -> None:
    """"L1 / layer name" at the left of each row, so readers know which layer a row shows."""
    tops = {}
    for box in boxes:
        tops.setdefault(box.node.level, (box.y, box.hw[0]))
    for level in range(1, levels + 1):
        if level not in tops:
            continue
        top, height = tops[level]
        layer = explanation.level(level)[0].layer
        y = header + top + height / 2 - 18
        colour = tuple(int(level_colour(level)[i:i + 2], 16) for i in (1, 3, 5))
        draw.text((margin, y), f"Level {level}", fill=colour, font=_font(16))
        draw.text((margin, y + 22), _fit_text(draw, layer, _font(12), LABEL_COLUMN - 16), fill=_MUTED, font=_font(12))

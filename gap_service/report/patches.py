"""The channel atlas on the page: beside each node's heatmap, the image patches its channel responds to.

A channel often appears under several parents (72 distinct channels among the 155 nodes of the
demo's depth-3, top-5 chelsea tree), so each channel's patches are one small grid picture inlined
once, as the background of a CSS class, and every node of that channel names the class.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from ..atlas import Atlas, AtlasNotFoundError, ChannelEntry
from ..colors import data_uri
from ..explanation import Node
from .overlay import resize

PATCH = 40  # px per patch on the page: a 3x3 grid of the top 9 is 122 px beside a 144 px heatmap
LINE = 1  # px of white between patches: without it neighbouring patches of similar colour merge
GAP = 6  # px between the heatmap and the grid
BLANK = 226  # grey of the cells of a grid that the channel's patches do not fill


@dataclass(frozen=True)
class ChannelPatches:
    """One channel's top patches as the page shows them: ``css_class`` carries the grid picture."""

    css_class: str
    image: str  # data URI of the grid, strongest patch top left, row by row
    entry: ChannelEntry


def grid_shape(count: int) -> tuple[int, int]:
    """(rows, columns) of the squarest grid holding ``count`` patches."""
    columns = max(math.ceil(math.sqrt(count)), 1)
    return max(math.ceil(count / columns), 1), columns


def grid_size(cells: int) -> int:
    """Pixels spanned by ``cells`` patches in a row or column of the grid."""
    return cells * PATCH + (cells - 1) * LINE if cells else 0


def cell_origin(index: int, columns: int) -> tuple[int, int]:
    """(top, left) of patch ``index`` in a grid of ``columns`` columns, filled row by row."""
    return (index // columns) * (PATCH + LINE), (index % columns) * (PATCH + LINE)


def grid_picture(pixels: np.ndarray, rows: int, columns: int) -> np.ndarray:
    """Patches [n, S, S, 3] shrunk to PATCH px each, row by row into a rows x columns grid."""
    grid = np.full((grid_size(rows), grid_size(columns), 3), 255, np.uint8)
    for index in range(rows * columns):
        top, left = cell_origin(index, columns)
        grid[top : top + PATCH, left : left + PATCH] = resize(pixels[index], (PATCH, PATCH)) if index < len(pixels) else BLANK
    return grid


def channel_patches(atlas: Atlas, nodes: Iterable[Node]) -> dict[tuple[str, int], ChannelPatches]:
    """The atlas entries of the nodes' channels, each once, keyed by (layer, channel).

    The root is the decision, not a channel: it has none; nodes of layers the atlas does not cover
    have none either. Entries are read in (layer, channel) order so that each sheet page of the
    atlas is decoded once.
    """
    rows, columns = grid_shape(atlas.top)
    found: dict[tuple[str, int], ChannelPatches] = {}
    for layer, channel in sorted({(n.layer, n.channel) for n in nodes if n.parent is not None}):
        try:
            entry = atlas.entry(layer, channel)
        except AtlasNotFoundError:
            continue
        image = data_uri(grid_picture(entry.pixels, rows, columns))
        found[(layer, channel)] = ChannelPatches(f"atlas{len(found)}", image, entry)
    return found

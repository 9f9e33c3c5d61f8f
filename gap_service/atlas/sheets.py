"""Cutting the kept patches into sprite sheets, every needed picture decoded once.

Patches are cut in image order into a scratch file (one decode per image, however many channels
and pages share it), then each sheet page is read back and encoded. Memory holds one picture and
one page, never the whole atlas: EfficientNet-Lite0's 2432 channels x 9 patches of 64 px are
270 MB of pixels.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image

from ..graph.layers import LayerInfo
from ..preprocess import Preprocessing, preprocess
from .images import ImageSource
from .receptive import Box, NotAnalysable, ReceptiveField
from .store import sheet_names, write_sheet

log = logging.getLogger(__name__)

GREY = 128  # letterbox bars and empty cells
SCRATCH = "atlas.cells.tmp"


@dataclass(frozen=True)
class SheetLayout:
    top: int
    patch_size: int
    rows_per_sheet: int

    @property
    def cell_bytes(self) -> int:
        return self.patch_size * self.patch_size * 3


@dataclass(frozen=True)
class KeptLayer:
    """What a scan kept for one layer: per channel the top (image, unit, activation), and statistics."""

    info: LayerInfo
    images: np.ndarray  # [C, top] image index, -1 where the set had too few images
    units: np.ndarray  # [C, top] flat spatial index
    values: np.ndarray  # [C, top]
    stats: Sequence[Mapping[str, float]]
    field: ReceptiveField | NotAnalysable
    effective: ReceptiveField | None


def cut_patch(picture: np.ndarray, box: Box, size: int) -> np.ndarray:
    """The box's pixels letterboxed into a grey square, scaled to size x size.

    Enlarged with nearest neighbours (an early layer's few pixels stay visible as they are),
    reduced with a box filter.
    """
    top, left, bottom, right = box
    crop = picture[top:bottom, left:right]
    side = max(crop.shape[:2])
    square = np.full((side, side, 3), GREY, np.uint8)
    y, x = (side - crop.shape[0]) // 2, (side - crop.shape[1]) // 2
    square[y : y + crop.shape[0], x : x + crop.shape[1]] = crop
    resample = Image.Resampling.NEAREST if side <= size else Image.Resampling.BOX
    return np.asarray(Image.fromarray(square).resize((size, size), resample))


def write_layers(directory: Path, kept: Sequence[KeptLayer], images: Sequence[ImageSource], preprocessing: Preprocessing,
                 picture_hw: tuple[int, int], layout: SheetLayout) -> list[dict[str, Any]]:
    """Every layer's sprite sheets in ``directory``; the layers' part of the index."""
    height, width = picture_hw
    bases = np.cumsum([0] + [layer.images.size * layout.cell_bytes for layer in kept])
    jobs: dict[int, list[tuple[int, Box]]] = defaultdict(list)  # image -> (scratch offset, box)
    layers = []
    for number, (layer, base) in enumerate(zip(kept, bases)):
        receptive = layer.field if isinstance(layer.field, ReceptiveField) else None
        boxes = layer.effective or receptive
        if isinstance(layer.field, NotAnalysable):
            log.warning("layer %s: %s; its patches are whole pictures", layer.info.name, layer.field.reason)
        sheets = sheet_names(number, layer.info.name, -(-layer.info.channels // layout.rows_per_sheet))
        channels = []
        for channel in range(layer.info.channels):
            patches = []
            for k in range(layout.top):
                image = int(layer.images[channel, k])
                if image < 0:
                    continue
                unit = tuple(int(u) for u in np.unravel_index(layer.units[channel, k], layer.info.spatial_shape))
                box = boxes.box(unit, height, width) if boxes else (0, 0, height, width)
                jobs[image].append((int(base) + (channel * layout.top + k) * layout.cell_bytes, box))
                patches.append({"image": images[image].name, "unit": list(unit), "box": list(box),
                                "activation": float(f"{float(layer.values[channel, k]):.6g}")})
            channels.append({"channel": channel, "sheet": channel // layout.rows_per_sheet,
                             "row": channel % layout.rows_per_sheet, "stats": dict(layer.stats[channel]), "patches": patches})
        layers.append({"name": layer.info.name, "shape": list(layer.info.shape), "channel_axis": layer.info.channel_axis,
                       "field": receptive.to_dict() if receptive else None,
                       "field_note": layer.field.reason if isinstance(layer.field, NotAnalysable) else None,
                       "effective_field": layer.effective.to_dict() if layer.effective else None,
                       "sheets": list(sheets), "rows_per_sheet": layout.rows_per_sheet, "channels": channels})
    scratch = directory / SCRATCH
    try:
        with open(scratch, "w+b") as cells:
            cells.truncate(int(bases[-1]))
            _cut(cells, jobs, images, preprocessing, layout.patch_size)
            for layer, base, entry in zip(kept, bases, layers):
                _write_pages(directory, cells, int(base), layer, entry["sheets"], layout)
    finally:
        scratch.unlink(missing_ok=True)
    return layers


def _cut(cells: BinaryIO, jobs: Mapping[int, list[tuple[int, Box]]], images: Sequence[ImageSource],
         preprocessing: Preprocessing, size: int) -> None:
    for image in sorted(jobs):
        picture = preprocess(images[image].load(), preprocessing)[1]
        cut: dict[Box, bytes] = {}  # a box kept by several channels (a whole picture, say) is cut once
        for offset, box in jobs[image]:
            if box not in cut:
                cut[box] = cut_patch(picture, box, size).tobytes()
            cells.seek(offset)
            cells.write(cut[box])


def _write_pages(directory: Path, cells: BinaryIO, base: int, layer: KeptLayer, sheets: Sequence[str],
                 layout: SheetLayout) -> None:
    size, per_row = layout.patch_size, layout.top * layout.cell_bytes
    for page, sheet in enumerate(sheets):
        first = page * layout.rows_per_sheet
        rows = min(layer.info.channels, first + layout.rows_per_sheet) - first
        cells.seek(base + first * per_row)
        pixels = np.frombuffer(cells.read(rows * per_row), np.uint8).reshape(rows, layout.top, size, size, 3).copy()
        pixels[layer.images[first : first + rows] < 0] = GREY
        write_sheet(directory, sheet, pixels)

"""The on-disk atlas: PNG sprite sheets plus one JSON index, tied to the model file's sha256.

    <atlas dir>/atlas.json            the index (format below); written last, so its presence
                                      means the atlas is complete
    <atlas dir>/<NN>_<layer>.<P>.png  sprite sheet page P of layer NN: one row per channel (at
                                      most ``rows_per_sheet`` rows a page), one column per top patch,
                                      each cell patch_size x patch_size RGB

atlas.json: {"format", "model": {"name", "sha256"}, "preprocessing", "top", "patch_size",
"effective_mass", "images": {"count", "skipped": [{"name", "reason"}]}, "layers": [{"name",
"shape", "channel_axis", "field" (receptive field, or null), "field_note" (why null),
"effective_field" (or null), "sheets", "rows_per_sheet", "channels": [{"channel", "sheet", "row",
"stats": {"mean", "fire_rate", "image_rate", "max"}, "patches": [{"image", "unit", "box",
"activation"}]}]}]}. A field is {"rows", "cols": {"size", "jump", "start"}, "global_context",
"transposed"}. ``box`` is [top, left, bottom, right) in pixels of the picture the model saw
(after resize and crop): the unit's effective field when the atlas has one, else its receptive
field, clipped to the picture; ``unit`` is the unit's spatial index in the layer.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import InvalidModelError, NotFoundError, invalid
from .receptive import Box, ReceptiveField

FORMAT = "gap-atlas/1"
INDEX = "atlas.json"
ATLAS_DIR = "atlas"
MODEL_FILE = "model.onnx"


class AtlasNotFoundError(NotFoundError):
    """No (complete) atlas where one was looked for, or no entry for a layer."""


class AtlasMismatchError(InvalidModelError):
    """The atlas was built for a different model file."""


def file_digest(path: str | Path) -> str:
    """sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_file(model: str | Path) -> Path:
    """The model.onnx of a version folder, or the file itself."""
    path = Path(model)
    return path / MODEL_FILE if path.is_dir() else path


def atlas_dir_for(model: str | Path) -> Path:
    """Where a model's atlas lives by default: ``atlas/`` beside the model file (its version folder)."""
    return model_file(model).parent / ATLAS_DIR


@dataclass(frozen=True)
class Patch:
    """One top activation: where (image, unit, box on the picture) and how strong."""

    image: str
    unit: tuple[int, int]
    box: Box
    activation: float


@dataclass(frozen=True)
class ChannelStats:
    """mean activation; fire_rate: fraction of all positions > 0; image_rate: of images with any."""

    mean: float
    fire_rate: float
    image_rate: float
    max: float


@dataclass(frozen=True)
class ChannelEntry:
    """What one channel responds to: its top patches (pixels [n, S, S, 3] uint8) and statistics;
    ``sheet`` and ``row`` say where the patches are on disk."""

    layer: str
    channel: int
    stats: ChannelStats
    patches: tuple[Patch, ...]
    pixels: np.ndarray
    sheet: Path
    row: int

    def strip_png(self) -> bytes:
        """All patches side by side, strongest first: one small picture per node for a report."""
        if not len(self.pixels):
            raise invalid("channel", f"channel {self.channel} of '{self.layer}' has no patches")
        return png_bytes(np.concatenate(list(self.pixels), axis=1))

    def patch_pngs(self) -> list[bytes]:
        return [png_bytes(cell) for cell in self.pixels]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, without pixels."""
        return {"layer": self.layer, "channel": self.channel, "stats": asdict(self.stats),
                "patches": [asdict(p) for p in self.patches], "sheet": self.sheet.name, "row": self.row}


@dataclass(frozen=True)
class LayerAtlas:
    """One layer's part of the index."""

    name: str
    shape: tuple[int, ...]
    channel_axis: int
    field: ReceptiveField | None
    field_note: str | None
    effective_field: ReceptiveField | None
    sheets: tuple[str, ...]
    rows_per_sheet: int
    channels: tuple[Mapping[str, Any], ...]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LayerAtlas:
        field, effective = (ReceptiveField.from_dict(data[k]) if data.get(k) else None for k in ("field", "effective_field"))
        return cls(data["name"], tuple(data["shape"]), int(data["channel_axis"]), field, data.get("field_note"), effective,
                   tuple(data["sheets"]), int(data["rows_per_sheet"]), tuple(data["channels"]))


class Atlas:
    """A loaded atlas, safe to share between threads; sheet pages are decoded on first use and
    the last few kept (a 128-channel page of 64 px patches is 14 MB decoded)."""

    def __init__(self, directory: Path, index: Mapping[str, Any]) -> None:
        self.directory = directory
        self.index = index
        self.digest: str = index["model"]["sha256"]
        self.model_name: str = index["model"]["name"]
        self.top: int = int(index["top"])
        self.patch_size: int = int(index["patch_size"])
        self.effective_mass: float | None = index["effective_mass"]
        self.image_count: int = int(index["images"]["count"])
        self.skipped: tuple[Mapping[str, str], ...] = tuple(index["images"]["skipped"])
        self.layers: dict[str, LayerAtlas] = {d["name"]: LayerAtlas.from_dict(d) for d in index["layers"]}
        self._sheet = functools.lru_cache(maxsize=4)(self._read_sheet)

    def layer(self, name: str) -> LayerAtlas:
        if name not in self.layers:
            raise AtlasNotFoundError(f"layer '{name}' is not in the atlas {self.directory} (layers: {list(self.layers)})")
        return self.layers[name]

    def entry(self, layer: str, channel: int) -> ChannelEntry:
        """The channel's top patches and statistics."""
        info = self.layer(layer)
        if not 0 <= channel < len(info.channels):
            raise invalid("channel", f"{channel} out of range: layer '{layer}' has {len(info.channels)} channels")
        data = info.channels[channel]
        patches = tuple(Patch(p["image"], tuple(p["unit"]), tuple(p["box"]), float(p["activation"])) for p in data["patches"])
        size, sheet = self.patch_size, info.sheets[data["sheet"]]
        row = self._sheet(sheet)[data["row"] * size : (data["row"] + 1) * size]
        pixels = np.ascontiguousarray(row[:, : len(patches) * size].reshape(size, len(patches), size, 3).transpose(1, 0, 2, 3))
        return ChannelEntry(layer, channel, ChannelStats(**data["stats"]), patches, pixels, self.directory / sheet, data["row"])

    def _read_sheet(self, name: str) -> np.ndarray:
        with Image.open(self.directory / name) as sheet:
            return np.asarray(sheet.convert("RGB"))


def load_atlas(model: str | Path, atlas_dir: str | Path | None = None) -> Atlas:
    """The atlas of a model file (or version folder), refused if it was built for another file."""
    path = model_file(model)
    directory = Path(atlas_dir) if atlas_dir is not None else atlas_dir_for(path)
    index_path = directory / INDEX
    if not index_path.is_file():
        raise AtlasNotFoundError(f"no atlas at {directory} (build one with: gap-service atlas {path})")
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError) as exc:
        raise InvalidModelError(f"cannot read the atlas index {index_path}: {exc}") from exc
    if index.get("format") != FORMAT:
        raise InvalidModelError(f"{index_path} has format {index.get('format')!r}, expected {FORMAT!r}")
    built_for, actual = index["model"]["sha256"], file_digest(path)
    if built_for != actual:
        raise AtlasMismatchError(
            f"the atlas at {directory} was built for a model file with sha256 {built_for}, but {path} has sha256 "
            f"{actual}: rebuild it with gap-service atlas {path}"
        )
    return Atlas(directory, index)


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def sheet_names(layer_index: int, layer: str, pages: int) -> tuple[str, ...]:
    """Readable, filesystem-safe sheet file names."""
    slug = "".join(c if c.isalnum() else "_" for c in layer).strip("_")[:60] or "layer"
    return tuple(f"{layer_index:02d}_{slug}.{page}.png" for page in range(pages))


def write_sheet(directory: Path, name: str, cells: np.ndarray) -> None:
    """cells [rows, columns, S, S, 3] uint8 -> one PNG, rows top to bottom."""
    rows, columns, size = cells.shape[:3]
    Image.fromarray(cells.transpose(0, 2, 1, 3, 4).reshape(rows * size, columns * size, 3)).save(
        directory / name, compress_level=3)  # 2x faster than the default 6 for 5% more bytes (measured on a sheet)


def write_index(directory: Path, index: Mapping[str, Any]) -> None:
    """Commit the atlas: the index replaces the old one atomically, then the old one's stale sheets go."""
    path = directory / INDEX
    previous: set[str] = set()
    if path.is_file():
        try:
            previous = _sheets(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError):
            previous = set()
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(index, separators=(",", ":")))
    os.replace(temporary, path)
    for stale in previous - _sheets(index):
        (directory / stale).unlink(missing_ok=True)


def _sheets(index: Mapping[str, Any]) -> set[str]:
    return {sheet for layer in index["layers"] for sheet in layer["sheets"]}

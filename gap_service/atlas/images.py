"""Reference images for an atlas: any folder, or the bundled photos with seeded augmented crops.

An image is a name and a loader, not pixels: the builder streams the set once and reopens only
the few images whose patches it keeps, so no set is ever held in memory.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import invalid
from ..preprocess import decode_image

BUNDLED_PHOTOS = Path(__file__).resolve().parents[2] / "examples" / "photos"
PHOTO_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})


@dataclass(frozen=True)
class ImageSource:
    """A named image, decoded on demand (the same pixels every call)."""

    name: str
    load: Callable[[], Image.Image]


def folder_images(folder: str | Path) -> list[ImageSource]:
    """Every non-hidden file under ``folder`` (recursively, sorted): unreadable ones fail on load."""
    root = Path(folder)
    if not root.is_dir():
        raise invalid("images", f"{root} is not a directory")
    files = sorted(p for p in root.rglob("*")
                   if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))
    return [ImageSource(p.relative_to(root).as_posix(), _decoder(p)) for p in files]


def _decoder(path: Path) -> Callable[[], Image.Image]:
    return lambda: decode_image(path, field_name=f"image {path}")


def augmented_crop(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A random crop of 20-90% of the area with aspect ratio 3/4..4/3, flipped half the time."""
    area = image.width * image.height * rng.uniform(0.2, 0.9)
    aspect = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
    width = min(image.width, round(np.sqrt(area * aspect)))
    height = min(image.height, round(np.sqrt(area / aspect)))
    left = int(rng.integers(0, image.width - width + 1))
    top = int(rng.integers(0, image.height - height + 1))
    crop = image.crop((left, top, left + width, top + height))
    return crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else crop


def with_crops(images: Sequence[ImageSource], crops: int, seed: int = 0) -> list[ImageSource]:
    """Each image followed by ``crops`` augmented crops named ``<name>#crop<k>``, seeded by (seed, name, k).

    An image and its crops are read in a row, so the last decoded original is kept for them.
    """
    if not crops:
        return list(images)
    original = functools.lru_cache(maxsize=1)(lambda index: images[index].load())
    result: list[ImageSource] = []
    for index, source in enumerate(images):
        load = functools.partial(original, index)
        result.append(ImageSource(source.name, load))
        result.extend(ImageSource(f"{source.name}#crop{k:02d}", _crop_loader(load, source.name, seed, k)) for k in range(crops))
    return result


def _crop_loader(load: Callable[[], Image.Image], name: str, seed: int, k: int) -> Callable[[], Image.Image]:
    return lambda: augmented_crop(load(), np.random.default_rng([seed, zlib.crc32(name.encode()), k]))


def reference_set(crops: int = 15, seed: int = 0, photos: Path = BUNDLED_PHOTOS) -> list[ImageSource]:
    """The bundled reference set: the package photos in examples/photos, each with its crops."""
    found = sorted(p for p in photos.glob("*") if p.suffix.lower() in PHOTO_SUFFIXES) if photos.is_dir() else []
    if not found:
        raise invalid("images", f"no bundled photos in {photos}; pass --images DIR")
    return with_crops([ImageSource(p.name, _decoder(p)) for p in found], crops, seed)

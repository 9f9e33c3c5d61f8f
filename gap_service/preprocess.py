"""Image decoding and per-model preprocessing (resize, crop, scale, mean/std, channel order, layout).

Returns both the model tensor and the RGB picture that the tensor shows (after resize/crop/pad),
so heatmaps can be laid over exactly what the network saw.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import ResourceLimitError, invalid

DEFAULT_MAX_PIXELS = 40_000_000
MAX_IMAGE_SIDE = 32_768
MAX_ASPECT_RATIO = 100  # for shorter-side resizing (check_resize)
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")  # not EPS (runs Ghostscript), nor TIFF's many codecs

# Our own limits are checked right after Pillow's header-only open; its warning (printed to stderr
# between 1x and 2x Image.MAX_IMAGE_PIXELS) would only add unstructured lines to the server log.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the model's input tensor.

    resize: "exact" (to size=[H, W]), "shorter_side" (shorter side to size[0], then center crop
    to ``crop``) or "fit_height" (height to size[0] keeping the aspect ratio, width capped at
    size[1], right side padded with zeros: text-line models).
    """

    resize: str = "exact"
    size: tuple[int, ...] = (224, 224)
    crop: tuple[int, int] | None = None
    scale: float = 1.0 / 255.0
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    channel_order: str = "RGB"
    layout: str = "NCHW"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Preprocessing:
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise invalid("preprocessing", f"unknown keys {sorted(unknown)}; known keys are {sorted(known)}")
        values = dict(data)
        for key in ("size", "crop", "mean", "std"):
            if values.get(key) is not None:
                values[key] = tuple(values[key])
        config = cls(**values)
        config.validate()
        return config

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self) -> None:
        if self.resize not in ("exact", "shorter_side", "fit_height"):
            raise invalid("preprocessing.resize", f"'{self.resize}' is not one of exact, shorter_side, fit_height")
        if self.channel_order not in ("RGB", "BGR"):
            raise invalid("preprocessing.channel_order", f"'{self.channel_order}' is not RGB or BGR")
        if self.layout not in ("NCHW", "NHWC"):
            raise invalid("preprocessing.layout", f"'{self.layout}' is not NCHW or NHWC")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise invalid("preprocessing.mean/std", "need three values each, std > 0")


def decode_image(data: bytes | str | Path, max_pixels: int = DEFAULT_MAX_PIXELS, field_name: str = "image") -> Image.Image:
    """Decode PNG/JPEG/WebP/BMP/GIF to RGB, refusing corrupt images and, from the header alone
    (before any pixel is decompressed), images over the limits of ``check_image_size``."""
    try:
        image = Image.open(io.BytesIO(data) if isinstance(data, bytes) else str(data), formats=IMAGE_FORMATS)
        check_image_size(image.size, max_pixels, field_name)
        image.load()
    except Image.DecompressionBombError as exc:  # over Pillow's own bound (2 x Image.MAX_IMAGE_PIXELS)
        raise ResourceLimitError(f"{field_name}: the image has more than {2 * (Image.MAX_IMAGE_PIXELS or 0)} pixels, "
                                 f"over the decoder's limit; the limit is {max_pixels} pixels") from exc
    except UnidentifiedImageError as exc:  # its message names a Python object: not for clients
        raise invalid(field_name, f"cannot decode the image: not a {', '.join(IMAGE_FORMATS)} image") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise invalid(field_name, f"cannot decode the image: {exc}") from exc
    return image.convert("RGB")


def check_image_size(size: tuple[int, int], max_pixels: int, field_name: str = "image") -> None:
    """Refuse an image whose pixels or sides exceed the limits (from its header: nothing decoded yet)."""
    width, height = size
    problem = ""
    if width * height > max_pixels:
        problem = f"{width * height} pixels exceeds the limit of {max_pixels}"
    elif max(width, height) > MAX_IMAGE_SIDE:
        problem = f"a side of {max(width, height)} pixels exceeds the limit of {MAX_IMAGE_SIDE}"
    elif min(width, height) < 1:
        problem = "it has no pixels"
    if problem:
        raise ResourceLimitError(f"{field_name}: {width}x{height} image: {problem}")


def check_resize(size: tuple[int, int], config: Preprocessing, max_pixels: int, field_name: str = "image") -> tuple[int, int]:
    """The resized (width, height), refused before resizing if the picture would be too large.

    A shorter-side resize keeps the aspect ratio, so that is bounded too: a 1 x 4000 PNG of 100
    bytes would become 256 x 1,024,000 pixels (2.5 GB as float32).
    """
    width, height = size
    resized = resized_size(size, config)
    problem = ""
    if config.resize == "shorter_side" and max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        problem = f"its aspect ratio exceeds the limit of {MAX_ASPECT_RATIO}:1"
    elif resized[0] * resized[1] > max_pixels:
        problem = f"resized to {resized[0]}x{resized[1]} it would exceed the limit of {max_pixels} pixels"
    if problem:
        raise ResourceLimitError(f"{field_name}: {width}x{height} image: {problem}")
    return resized


def resized_size(size: tuple[int, int], config: Preprocessing) -> tuple[int, int]:
    """(width, height) of the image after the preprocessing's resize, before any crop."""
    width, height = size
    if config.resize == "exact":
        return int(config.size[1]), int(config.size[0])
    if config.resize == "shorter_side":
        ratio = int(config.size[0]) / min(width, height)
        return round(width * ratio), round(height * ratio)
    target_height, max_width = int(config.size[0]), int(config.size[1])
    return min(max_width, math.ceil(target_height * width / height)), target_height


def _center_crop(pixels: np.ndarray, crop: tuple[int, int]) -> np.ndarray:
    height, width = pixels.shape[:2]
    ch, cw = crop
    if height < ch or width < cw:
        raise invalid("image", f"the resized image {width}x{height} is smaller than the crop {cw}x{ch}")
    top, left = (height - ch) // 2, (width - cw) // 2
    return pixels[top : top + ch, left : left + cw]


def preprocess(image: Image.Image, config: Preprocessing, max_pixels: int = DEFAULT_MAX_PIXELS,
               field_name: str = "image") -> tuple[np.ndarray, np.ndarray]:
    """(input tensor [1, ...] float32, the RGB uint8 picture the tensor shows); ``check_resize`` first."""
    resized = check_resize(image.size, config, max_pixels, field_name)
    pixels = np.asarray(image.resize(resized, Image.Resampling.BILINEAR), dtype=np.uint8)
    if config.crop:
        pixels = _center_crop(pixels, (int(config.crop[0]), int(config.crop[1])))
    picture = pixels
    if config.resize == "fit_height":
        height, max_width = int(config.size[0]), int(config.size[1])
        picture = np.zeros((height, max_width, 3), dtype=np.uint8)
        picture[:, : pixels.shape[1]] = pixels
    channels = pixels[..., ::-1] if config.channel_order == "BGR" else pixels
    mean = np.asarray(config.mean, dtype=np.float32)
    std = np.asarray(config.std, dtype=np.float32)
    normalised = (channels.astype(np.float32) * np.float32(config.scale) - mean) / std
    if config.resize == "fit_height":
        padded = np.zeros((picture.shape[0], picture.shape[1], 3), dtype=np.float32)
        padded[:, : normalised.shape[1]] = normalised
        normalised = padded
    tensor = normalised.transpose(2, 0, 1) if config.layout == "NCHW" else normalised
    return np.ascontiguousarray(tensor[None], dtype=np.float32), np.ascontiguousarray(picture)


def load_preprocessing(path: str | Path) -> Preprocessing:
    import json

    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise invalid("preprocessing", f"cannot read preprocessing file {path}: {exc}") from exc
    return Preprocessing.from_dict(data.get("preprocessing", data))



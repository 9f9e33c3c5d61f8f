"""Example inputs (no downloads): rendered document pages and text lines, and the bundled photos.

Pages and text lines suit the orientation models and make seeded, reproducible evaluation sets of
any size; the ImageNet model's set is the photos of examples/photos (see its LICENSES.md).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

WORDS = (
    "the network decides from evidence found in layers below each channel supports a decision "
    "gradient times activation shows which features carry the class model explain hierarchy "
    "service image page text orientation document paragraph figure table results method data"
).split()


def _sentence(rng: np.random.Generator, words: int) -> str:
    text = " ".join(rng.choice(WORDS, size=words))
    return text[0].upper() + text[1:]


def document_page(seed: int = 0, size: tuple[int, int] = (640, 860)) -> Image.Image:
    """A white page with a title and paragraphs of black text."""
    rng = np.random.default_rng(seed)
    width, height = size
    page = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(page)
    title = ImageFont.load_default(size=int(rng.integers(28, 38)))
    body = ImageFont.load_default(size=int(rng.integers(16, 22)))
    margin = int(rng.integers(30, 70))
    draw.text((margin, 40), _sentence(rng, 3).title(), fill="black", font=title)
    y = 110
    line_height = int(body.size * 1.45)
    while y < height - 80:
        for _ in range(int(rng.integers(3, 7))):
            if y >= height - 60:
                break
            draw.text((margin, y), _sentence(rng, int(rng.integers(5, 9))), fill=(20, 20, 20), font=body)
            y += line_height
        y += line_height // 2
    return page


def text_line(seed: int = 0) -> Image.Image:
    """One line of dark text on a light background, as a text detector would crop it."""
    rng = np.random.default_rng(seed)
    font = ImageFont.load_default(size=int(rng.integers(26, 34)))
    text = _sentence(rng, int(rng.integers(2, 4)))
    left, top, right, bottom = font.getbbox(text)
    image = Image.new("RGB", (right + 16, bottom + 12), tuple(int(v) for v in rng.integers(225, 256, 3)))
    ImageDraw.Draw(image).text((8, 6 - top // 2), text, fill=tuple(int(v) for v in rng.integers(0, 60, 3)), font=font)
    return image


PHOTOS = Path(__file__).resolve().parent.parent / "examples" / "photos"
PHOTO_MODELS = frozenset({"efficientnet_lite0"})


def photo_set() -> list[Image.Image]:
    """The bundled photos as shipped, then their mirror images: a small set of real inputs."""
    photos = [Image.open(path).convert("RGB") for path in sorted(PHOTOS.glob("*.[jp][pn]g"))]
    return photos + [photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for photo in photos]


def evaluation_set(model: str, count: int) -> list[Image.Image]:
    """The first ``count`` images of a model's evaluation set (rotations cover every class); the
    photo set is finite, so a photo model gets at most its size."""
    if model in PHOTO_MODELS:
        return photo_set()[:count]
    if model == "ppocr_cls":
        lines = [text_line(seed=1000 + index) for index in range(count)]
        return [line.rotate(180) if index % 2 else line for index, line in enumerate(lines)]
    return [document_page(seed=index).rotate(90 * (index % 4), expand=True) for index in range(count)]

"""Example inputs made by the project (no downloads): rendered document pages and text lines.

They suit the bundled models (page orientation, text-line direction) and make seeded,
reproducible evaluation sets.
"""

from __future__ import annotations

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


def evaluation_image(model: str, index: int) -> Image.Image:
    """The index-th image of a model's evaluation set (rotations cover every class)."""
    if model == "ppocr_cls":
        line = text_line(seed=1000 + index)
        return line.rotate(180) if index % 2 else line
    page = document_page(seed=index)
    return page.rotate(90 * (index % 4), expand=True)

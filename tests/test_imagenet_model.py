"""The bundled ImageNet model (EfficientNet-Lite0) on the bundled photos: the README's main job.

Checks the exported model and its config, not the engine: the labels line up with the logits
(top-1 sensible on two photos), the preprocessing is EfficientNet-Lite's (x - 127) / 128 and
survives a round trip, and the layer chain is the network's stage outputs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gap_service.preprocess import Preprocessing, decode_image, preprocess
from gap_service.repository import BUNDLED_REPOSITORY, ModelEntry, load_repository

PHOTOS = Path(__file__).resolve().parent.parent / "examples" / "photos"


@pytest.fixture(scope="module")
def entry() -> ModelEntry:
    return load_repository(BUNDLED_REPOSITORY)["efficientnet_lite0"]


def top1_label(entry: ModelEntry, photo: str) -> str:
    tensor, picture = preprocess(decode_image((PHOTOS / photo).read_bytes()), entry.config.preprocessing)
    tree = entry.explainer().explain(tensor, picture=picture, depth=1)
    return entry.config.labels[tree.target]


@pytest.mark.parametrize(
    ("photo", "expected"),
    [
        ("chelsea.png", {"tiger cat", "Egyptian cat", "tabby, tabby cat"}),
        ("coffee.png", {"espresso", "cup"}),
    ],
)
def test_top1_is_sensible(entry: ModelEntry, photo: str, expected: set[str]) -> None:
    assert top1_label(entry, photo) in expected


def test_labels_are_the_1000_imagenet_classes(entry: ModelEntry) -> None:
    labels = entry.config.labels
    assert len(labels) == 1000 and len(set(labels)) == 999  # "crane": the bird (134) and the machine (517)
    assert (labels[0], labels[282], labels[967]) == ("tench, Tinca tinca", "tiger cat", "espresso")


def test_preprocessing_is_lite_normalisation_and_round_trips(entry: ModelEntry) -> None:
    config = entry.config.preprocessing
    assert Preprocessing.from_dict(config.to_dict()) == config
    tensor, picture = preprocess(decode_image(PHOTOS / "chelsea.png"), config)
    assert tensor.shape == (1, 3, 224, 224) and picture.shape == (224, 224, 3)
    expected = (picture.astype(np.float32) - 127.0) / 128.0
    np.testing.assert_array_equal(tensor[0], expected.transpose(2, 0, 1))


def test_layer_chain_is_the_stage_outputs(entry: ModelEntry) -> None:
    """No padded copy of a map (the export merges each 'SAME' Pad into its Conv)."""
    layers = entry.explainer().compiled().layers
    assert [(info.channels, *info.spatial_shape) for info in layers] == [
        (1280, 7, 7), (672, 14, 14), (240, 28, 28), (144, 56, 56), (96, 112, 112),
    ]

"""The channel atlas: streaming top-n against brute force, digests, unreadable images, resume."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from torch import nn

from gap_service import Explainer
from gap_service.atlas import (AtlasMismatchError, ImageSource, Progress, ReceptiveField, build_atlas, file_digest,
                               folder_images, load_atlas, reference_set, with_crops)
from gap_service.atlas.build import CHECKPOINT, RunningTop
from gap_service.atlas.sheets import cut_patch
from gap_service.cli import main
from gap_service.preprocess import Preprocessing, preprocess
from support.models import TorchCase, export_onnx

SIZE = 32
PREPROCESSING = Preprocessing(resize="exact", size=(SIZE, SIZE))
IMAGES = 7


class TinyCNN(nn.Module):
    """Two stages (32x32 and 8x8 maps) and a classifier: two default layers."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(4, 5, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def write_model(folder: Path, seed: int = 0) -> Path:
    path = folder / "1" / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(export_onnx(TorchCase(f"atlas_tiny_{seed}", TinyCNN(seed).eval(), (1, 3, SIZE, SIZE))))
    return path


def write_images(folder: Path, count: int = IMAGES) -> Path:
    """Seeded pictures of varied size: coloured blocks on noise."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        height, width = (int(v) for v in rng.integers(24, 60, 2))
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        top, left = int(rng.integers(0, height // 2)), int(rng.integers(0, width // 2))
        pixels[top : top + height // 3, left : left + width // 3] = rng.integers(0, 256, 3, dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"image_{i}.png")
    return folder


@pytest.fixture()
def model(tmp_path: Path) -> Path:
    return write_model(tmp_path / "model")


@pytest.fixture()
def images(tmp_path: Path) -> list[ImageSource]:
    return folder_images(write_images(tmp_path / "images"))


def build(model: Path, images: list[ImageSource], out: Path, **options):
    explainer = Explainer(model)
    return build_atlas(explainer, images, PREPROCESSING, out, digest=file_digest(model), **{"top": 3, "batch": 3, **options})


def brute_force(model: Path, layers: list[str], images: list[ImageSource]) -> dict[str, np.ndarray]:
    """Every layer's activations and its ReLU's input on every image, [N, C, H, W], straight from onnxruntime."""
    proto = onnx.load(str(model))
    relu_inputs = {node.output[0]: node.input[0] for node in proto.graph.node if node.op_type == "Relu"}
    names = [*layers, *(relu_inputs[name] for name in layers)]
    proto.graph.output.extend(onnx.ValueInfoProto(name=name) for name in names)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    runs = [session.run(names, {"input": preprocess(s.load(), PREPROCESSING)[0]}) for s in images]
    stacked = {name: np.concatenate([run[i] for run in runs]) for i, name in enumerate(names)}
    return {**{name: stacked[name] for name in layers}, **{f"{name} pre": stacked[relu_inputs[name]] for name in layers}}


def test_top_patches_are_the_true_top_activations(model: Path, images: list[ImageSource], tmp_path: Path) -> None:
    """Each channel's patches: the images with the highest activation, at their strongest unit; ties
    (zeros of a ReLU) broken by the ReLU's input, then by image order. Top 7 of 7 images: ranks all
    of them, the two that never fire in channel 1 of the 8x8 map included."""
    atlas = build(model, images, tmp_path / "atlas", top=IMAGES)
    layers = list(atlas.layers)
    assert len(layers) == 2 and atlas.image_count == IMAGES
    truth = brute_force(model, layers, images)
    for name in layers:
        acts, pre = truth[name], truth[f"{name} pre"]  # [N, C, H, W]
        for channel in range(acts.shape[1]):
            best = acts[:, channel].reshape(IMAGES, -1).max(axis=1)
            best_pre = pre[:, channel].reshape(IMAGES, -1).max(axis=1)
            order = sorted(range(IMAGES), key=lambda i: (-best[i], -best_pre[i], i))
            entry = atlas.entry(name, channel)
            assert [p.image for p in entry.patches] == [images[i].name for i in order]
            np.testing.assert_allclose([p.activation for p in entry.patches], best[order], rtol=1e-5)
            for patch, i in zip(entry.patches, order):
                assert pre[(i, channel, *patch.unit)] == pytest.approx(best_pre[i], rel=1e-5)
            values = acts[:, channel]
            stats = entry.stats
            assert stats.mean == pytest.approx(values.mean(), rel=1e-4, abs=1e-6)
            assert stats.fire_rate == pytest.approx((values > 0).mean(), rel=1e-5)
            assert stats.image_rate == pytest.approx((best > 0).mean(), rel=1e-5)
            assert stats.max == pytest.approx(best.max(), rel=1e-5)


def test_saturated_channels_are_ranked_by_the_pre_activation() -> None:
    """ReLU6: every image reaches 6.0; the unit and image that went furthest past it win."""
    running = RunningTop(channels=1, top=2, positions=3)
    pre = np.array([[7.0, 5.0, 6.5], [2.0, 9.0, 6.0], [8.0, 8.5, 1.0]], np.float32)  # image x unit
    summaries = [RunningTop.summarise(np.clip(p, 0, 6).reshape(1, 1, 3), p.reshape(1, 1, 3), 1) for p in pre]
    running.merge(summaries[:1], [0])
    running.merge(summaries[1:], [1, 2])
    assert running.images.tolist() == [[1, 2]] and running.units.tolist() == [[1, 1]]
    assert running.values.tolist() == [[6.0, 6.0]]


def test_patches_are_the_receptive_fields_cut_from_the_picture(model: Path, images: list[ImageSource], tmp_path: Path) -> None:
    atlas = build(model, images, tmp_path / "atlas")
    names = {s.name: s for s in images}
    for name, layer in atlas.layers.items():
        assert isinstance(layer.field, ReceptiveField)
        entry = atlas.entry(name, 1)
        assert entry.pixels.shape == (3, atlas.patch_size, atlas.patch_size, 3)
        for patch, pixels in zip(entry.patches, entry.pixels):
            picture = preprocess(names[patch.image].load(), PREPROCESSING)[1]
            assert patch.box == layer.field.box(patch.unit, SIZE, SIZE)
            np.testing.assert_array_equal(pixels, cut_patch(picture, patch.box, atlas.patch_size))
        strip = np.asarray(Image.open(io.BytesIO(entry.strip_png())))
        np.testing.assert_array_equal(strip, np.concatenate(list(entry.pixels), axis=1))
        assert entry.sheet.is_file() and json.loads(json.dumps(entry.to_dict()))["row"] == 1
    # 8x8 map behind conv k3 p1, maxpool 2, conv k3 s2 p1: field (3+1+2*2, 4, -1-2) = (8, 4, -3)
    assert atlas.layers[list(atlas.layers)[0]].field.rows.__dict__ == {"size": 8, "jump": 4, "start": -3}


def test_an_atlas_for_another_model_file_is_refused(model: Path, images: list[ImageSource], tmp_path: Path) -> None:
    build(model, images, model.parent / "atlas")
    assert load_atlas(model).digest == file_digest(model)
    built_for = file_digest(model)
    model.write_bytes(write_model(tmp_path / "other", seed=1).read_bytes())
    with pytest.raises(AtlasMismatchError) as caught:
        load_atlas(model.parent)
    assert built_for in caught.value.message and file_digest(model) in caught.value.message


def test_unreadable_files_are_skipped_and_counted(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = write_images(tmp_path / "images")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (folder / "notes.txt").write_text("not an image")
    config = {"name": "tiny", "preprocessing": {"resize": "exact", "size": [SIZE, SIZE]}}
    (model.parent.parent / "config.json").write_text(json.dumps(config))  # a repository entry: its preprocessing
    assert main(["atlas", str(model), "--images", str(folder), "--top", "2"]) == 0
    atlas = load_atlas(model)  # written beside the model file
    assert atlas.image_count == IMAGES
    assert sorted(s["name"] for s in atlas.skipped) == ["broken.png", "notes.txt"]
    captured = capsys.readouterr()
    assert "skipped 2 unreadable image(s): broken.png, notes.txt" in captured.err
    assert f"from {IMAGES} images" in captured.out


class Interrupt(Exception):
    """Stands for a crash: only the periodic checkpoint survives it."""


@pytest.mark.parametrize("stop, every", [(KeyboardInterrupt, 100), (Interrupt, 2)])  # saved on Ctrl-C / periodically
def test_resume_after_an_interruption_gives_the_same_atlas(model: Path, images: list[ImageSource], tmp_path: Path,
                                                           stop: type[BaseException], every: int) -> None:
    reference = build(model, images, tmp_path / "whole", batch=2)

    def interrupt(progress: Progress) -> None:
        if progress.done >= 4:
            raise stop()

    out = tmp_path / "resumed"
    with pytest.raises(stop):
        build(model, images, out, batch=2, checkpoint_every=every, on_progress=interrupt)
    assert (out / CHECKPOINT).is_file() and not (out / "atlas.json").exists()
    seen: list[Progress] = []
    resumed = build(model, images, out, batch=3, on_progress=seen.append)  # another batch size: same result
    assert seen[0].resumed_from == 4 and not (out / CHECKPOINT).exists()
    assert (out / "atlas.json").read_text() == (tmp_path / "whole" / "atlas.json").read_text()
    for layer in reference.layers.values():
        for sheet in layer.sheets:
            assert (out / sheet).read_bytes() == (tmp_path / "whole" / sheet).read_bytes()
    assert resumed.index == reference.index


def test_a_checkpoint_of_other_settings_is_not_resumed(model: Path, images: list[ImageSource], tmp_path: Path) -> None:
    def interrupt(progress: Progress) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build(model, images, tmp_path / "atlas", on_progress=interrupt)
    seen: list[Progress] = []
    build(model, images, tmp_path / "atlas", top=2, on_progress=seen.append)
    assert seen[0].resumed_from == 0


def test_effective_fields_shrink_the_boxes_inside_the_receptive_fields(model: Path, images: list[ImageSource],
                                                                        tmp_path: Path) -> None:
    whole = build(model, images, tmp_path / "whole", effective=1.0)
    half = build(model, images, tmp_path / "half", effective=0.3)
    for name, layer in half.layers.items():
        assert layer.effective_field is not None and layer.field is not None
        assert whole.layers[name].effective_field == layer.field  # all the gradient lies in the field
        assert layer.effective_field.rows.size <= layer.field.rows.size
        patch = half.entry(name, 0).patches[0]
        assert patch.box == layer.effective_field.box(patch.unit, SIZE, SIZE)
    top = half.layers[next(iter(half.layers))]  # the 8x8 map: 8 px field
    assert top.effective_field.rows.size < top.field.rows.size
    index = json.loads((tmp_path / "half" / "atlas.json").read_text())
    assert index["effective_mass"] == 0.3


def test_augmented_crops_are_reproducible(tmp_path: Path) -> None:
    originals = folder_images(write_images(tmp_path / "images", count=2))
    first, second = with_crops(originals, 3, seed=5), with_crops(originals, 3, seed=5)
    assert [s.name for s in first] == ["image_0.png", *(f"image_0.png#crop{k:02d}" for k in range(3)),
                                       "image_1.png", *(f"image_1.png#crop{k:02d}" for k in range(3))]
    for a, b in zip(first, second):
        np.testing.assert_array_equal(np.asarray(a.load()), np.asarray(b.load()))
    crops = [np.asarray(s.load()) for s in first[1:4]]
    assert any(c.shape != crops[0].shape or not np.array_equal(c, crops[0]) for c in crops[1:])


def test_the_bundled_reference_set_is_the_photos_and_their_crops() -> None:
    names = [s.name for s in reference_set(crops=2)]
    photos = [n for n in names if "#" not in n]
    assert len(photos) >= 6 and "chelsea.png" in photos and len(names) == 3 * len(photos)

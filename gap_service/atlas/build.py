"""Building an atlas: stream a reference set through the model, keep each channel's top patches.

One forward session taps every atlas layer at once (``Explainer.forward``); the model takes
batch 1, so a batch is ``batch`` such forwards whose results are merged into the running state
together. Memory is bounded whatever the set size: per layer and channel the state is the
``top`` best (activation, image, unit) triples plus four running sums; activations are dropped
after each image. Each image competes once per channel, at its strongest unit, so a channel's
patches come from ``top`` different images. Units are ranked by the activation's input when the
layer is the output of a monotone activation (ReLU6 in EfficientNet-Lite clips the top nine of 300
of the 1280 last-stage channels at 6.0): the same order, with ties at saturation broken by how far
past it the unit went instead of by image order and raster position. Remaining ties go to the
earlier image: the result does not depend on batch size or on where a run was interrupted.

The state is checkpointed every ``checkpoint_every`` images and on Ctrl-C, keyed by the model
digest, the image names, the layers, ``top`` and the preprocessing: a rerun with the same key
resumes, any other key starts afresh. Patches are cut at the end by reopening only the images
that won (sheets.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import GapError, invalid
from ..explainer import Explainer
from ..graph.loader import NormalizedModel
from ..preprocess import Preprocessing, preprocess
from .effective import effective_fields
from .images import ImageSource
from .receptive import ReceptiveField, image_axes, receptive_fields
from .sheets import KeptLayer, SheetLayout, write_layers
from .store import FORMAT, Atlas, write_index

log = logging.getLogger(__name__)

CHECKPOINT = "atlas.checkpoint.npz"
MONOTONE = frozenset({"Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "Tanh", "Softplus", "Elu", "Selu"})
EFFECTIVE_IMAGES = 8  # images the effective fields are measured on


@dataclass(frozen=True)
class Progress:
    """Where a build stands: images ``done`` of ``total`` (skipped ones included)."""

    done: int
    total: int
    skipped: int
    resumed_from: int
    elapsed: float


ProgressCallback = Callable[[Progress], None]


@dataclass
class ImageSummary:
    """One image's contribution to one layer: per-channel sums and its best unit."""

    total: np.ndarray  # [C] float64 sum of activations
    positive: np.ndarray  # [C] positions > 0
    best: np.ndarray  # [C] float32 strongest activation
    key: np.ndarray  # [C] its ranking key (the pre-activation, or the activation itself)
    unit: np.ndarray  # [C] flat spatial index of it


class RunningTop:
    """Per channel: the ``top`` strongest images (at their best unit) and running statistics."""

    ARRAYS = ("values", "keys", "images", "units", "total", "positive", "fired")

    def __init__(self, channels: int, top: int, positions: int) -> None:
        self.positions = positions
        self.values = np.full((channels, top), -np.inf, np.float32)
        self.keys = np.full((channels, top), -np.inf, np.float32)
        self.images = np.full((channels, top), -1, np.int64)
        self.units = np.zeros((channels, top), np.int64)
        self.total = np.zeros(channels, np.float64)
        self.positive = np.zeros(channels, np.int64)
        self.fired = np.zeros(channels, np.int64)
        self.count = 0

    @staticmethod
    def summarise(activation: np.ndarray, key: np.ndarray, channel_axis: int) -> ImageSummary:
        maps, keys = (np.moveaxis(a[0], channel_axis - 1, 0).reshape(a.shape[channel_axis], -1) for a in (activation, key))
        unit = keys.argmax(axis=1)
        rows = np.arange(len(maps))
        return ImageSummary(maps.sum(axis=1, dtype=np.float64), (maps > 0).sum(axis=1), maps[rows, unit], keys[rows, unit],
                            unit)

    def merge(self, summaries: Sequence[ImageSummary], images: Sequence[int]) -> None:
        """Fold a batch in, in image order (float sums then do not depend on batch boundaries)."""
        if not summaries:
            return
        for s in summaries:
            self.total += s.total
            self.positive += s.positive
            self.fired += s.best > 0
        self.count += len(summaries)
        top = self.values.shape[1]
        values, keys, units = (np.concatenate([mine, np.stack([getattr(s, attribute) for s in summaries], axis=1)], axis=1)
                               for mine, attribute in ((self.values, "best"), (self.keys, "key"), (self.units, "unit")))
        ids = np.concatenate([self.images, np.broadcast_to(np.asarray(images, np.int64), (len(values), len(images)))], axis=1)
        order = np.lexsort((np.where(ids < 0, np.iinfo(np.int64).max, ids), -keys), axis=1)[:, :top]
        self.values, self.keys, self.images, self.units = (np.take_along_axis(a, order, axis=1)
                                                           for a in (values, keys, ids, units))

    def stats(self, channel: int) -> dict[str, float]:
        count = max(self.count, 1)
        return {"mean": _round(self.total[channel] / (count * self.positions)),
                "fire_rate": _round(self.positive[channel] / (count * self.positions)),
                "image_rate": _round(self.fired[channel] / count), "max": _round(self.values[channel, 0])}

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}{name}": getattr(self, name) for name in self.ARRAYS} | {f"{prefix}count": np.asarray(self.count)}

    def restore(self, arrays: Any, prefix: str) -> None:
        for name in self.ARRAYS:
            setattr(self, name, arrays[f"{prefix}{name}"])
        self.count = int(arrays[f"{prefix}count"])


def _round(value: float) -> float:
    return float(f"{float(value):.6g}")


@dataclass
class _State:
    tops: list[RunningTop]
    done: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)


def build_atlas(
    explainer: Explainer,
    images: Sequence[ImageSource],
    preprocessing: Preprocessing,
    out_dir: str | Path,
    *,
    digest: str,
    layers: Sequence[str] | None = None,
    top: int = 9,
    batch: int = 16,
    patch_size: int = 64,
    rows_per_sheet: int = 128,
    checkpoint_every: int = 256,
    effective: float | None = None,
    on_progress: ProgressCallback | None = None,
) -> Atlas:
    """Build (or resume) the atlas of ``layers`` (default: the explainer's default layers) into ``out_dir``.

    ``digest`` is the sha256 of the model file the explainer was made from (``file_digest``):
    the atlas is tied to it. Unreadable images are skipped and listed in the index. Patch boxes
    are the units' receptive fields; with ``effective`` (a fraction such as 0.5) they are the
    measured effective fields holding that share of the input gradient (effective.py).
    """
    if top < 1 or batch < 1 or patch_size < 4 or rows_per_sheet < 1 or checkpoint_every < 1:
        raise invalid("options", "top, batch, rows_per_sheet and checkpoint_every must be >= 1, patch_size >= 4")
    if effective is not None and not 0 < effective <= 1:
        raise invalid("effective", f"{effective} is not a fraction in (0, 1]")
    compiled = explainer.compiled()
    chosen = layers or explainer.default_layers
    infos = [compiled.layer(name) for name in chosen] if chosen else explainer.layer_infos()
    names = [info.name for info in infos]
    image = explainer.inputs[0].name
    axes = image_axes(compiled.nm, image)
    if axes is None:
        raise invalid("model", f"input '{image}' of shape {list(compiled.nm.inputs[image])} is not an image")
    picture_hw = compiled.nm.inputs[image][axes[0]], compiled.nm.inputs[image][axes[1]]
    fields = receptive_fields(compiled.nm, names, image)
    ranking = ranking_tensors(compiled.nm, names)
    tapped = list(dict.fromkeys([*names, *ranking.values()]))
    directory = Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(json.dumps(
        {"format": FORMAT, "digest": digest, "images": [s.name for s in images], "layers": names, "top": top,
         "preprocessing": preprocessing.to_dict()}, sort_keys=True).encode()).hexdigest()
    state = _State([RunningTop(info.channels, top, math.prod(info.spatial_shape)) for info in infos])
    resumed_from = state.done = _restore(directory / CHECKPOINT, key, state)
    started, saved = time.perf_counter(), state.done
    try:
        for first in range(state.done, len(images), batch):
            chunk = images[first : first + batch]
            summaries: list[list[ImageSummary]] = [[] for _ in infos]
            ids: list[int] = []
            for offset, source in enumerate(chunk):
                try:
                    tensor, _ = preprocess(source.load(), preprocessing)
                except GapError as exc:
                    state.skipped.append({"name": source.name, "reason": exc.message})
                    continue
                _check_shape(tensor, compiled.nm.inputs[image])
                activations = explainer.forward(tensor, tapped)
                for i, info in enumerate(infos):
                    summaries[i].append(RunningTop.summarise(activations[info.name], activations[ranking[info.name]],
                                                             info.channel_axis))
                ids.append(first + offset)
            for running, batch_summaries in zip(state.tops, summaries):
                running.merge(batch_summaries, ids)
            state.done = first + len(chunk)
            if state.done - saved >= checkpoint_every:
                _save(directory / CHECKPOINT, key, state)
                saved = state.done
            if on_progress:
                on_progress(Progress(state.done, len(images), len(state.skipped), resumed_from, time.perf_counter() - started))
    except KeyboardInterrupt:
        if state.done > saved:
            _save(directory / CHECKPOINT, key, state)
        raise
    if state.tops[0].count == 0:
        raise invalid("images", f"none of the {len(images)} images could be read; the first: {state.skipped[0]['reason']}")
    if state.done > saved:  # an interruption while the sheets are written resumes straight at them
        _save(directory / CHECKPOINT, key, state)
    analysable = {name: f for name, f in fields.items() if isinstance(f, ReceptiveField)}
    effective_of = effective_fields(explainer, analysable, _sample_tensors(images, preprocessing, EFFECTIVE_IMAGES),
                                    effective) if effective is not None and analysable else {}
    kept = [KeptLayer(info, running.images, running.units, running.values, [running.stats(c) for c in range(info.channels)],
                      fields[info.name], effective_of.get(info.name)) for info, running in zip(infos, state.tops)]
    layers = write_layers(directory, kept, images, preprocessing, picture_hw, SheetLayout(top, patch_size, rows_per_sheet))
    index = {"format": FORMAT, "model": {"name": explainer.name, "sha256": digest}, "preprocessing": preprocessing.to_dict(),
             "top": top, "patch_size": patch_size, "effective_mass": effective,
             "images": {"count": state.tops[0].count, "skipped": state.skipped}, "layers": layers}
    write_index(directory, index)
    (directory / CHECKPOINT).unlink(missing_ok=True)
    return Atlas(directory, index)


def ranking_tensors(nm: NormalizedModel, names: Sequence[str]) -> dict[str, str]:
    """Per layer, the tensor its units are ranked by: the input of a monotone activation making it
    (same order, but no ties at saturation), else the layer itself."""
    tensors = nm.graph().tensors()
    ranking = {}
    for name in names:
        producer = tensors[name].inputs[0] if tensors[name].inputs else None
        data = producer.inputs[0] if producer is not None and producer.op in MONOTONE else None
        ranking[name] = data.name if data is not None and nm.shapes.get(data.name) == nm.shapes[name] else name
    return ranking


def _check_shape(tensor: np.ndarray, expected: Sequence[int]) -> None:
    if tuple(tensor.shape) != tuple(expected):
        raise invalid("preprocessing", f"gives tensors of shape {list(tensor.shape)}, the model takes {list(expected)}")


def _save(path: Path, key: str, state: _State) -> None:
    """Atomically: a run killed while saving keeps the previous checkpoint."""
    meta = json.dumps({"key": key, "done": state.done, "skipped": state.skipped})
    arrays = {k: v for i, t in enumerate(state.tops) for k, v in t.arrays(f"{i}/").items()}
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as handle:
        np.savez(handle, meta=np.asarray(meta), **arrays)
    os.replace(temporary, path)


def _restore(path: Path, key: str, state: _State) -> int:
    """Images already done by an interrupted run with the same key (0 if none)."""
    if not path.is_file():
        return 0
    try:
        with np.load(path, allow_pickle=False) as arrays:
            meta = json.loads(str(arrays["meta"]))
            if meta["key"] != key:
                log.warning("ignoring the checkpoint %s: it belongs to another model, image set or settings", path)
                return 0
            for i, running in enumerate(state.tops):
                running.restore(arrays, f"{i}/")
    except (OSError, ValueError, KeyError) as exc:
        log.warning("ignoring the unreadable checkpoint %s: %s", path, exc)
        return 0
    state.skipped = list(meta["skipped"])
    log.info("resuming after %d of the images from %s", meta["done"], path)
    return int(meta["done"])


def _sample_tensors(images: Sequence[ImageSource], preprocessing: Preprocessing, count: int) -> list[np.ndarray]:
    """The first ``count`` readable images as model inputs."""
    tensors: list[np.ndarray] = []
    for source in images:
        if len(tensors) == count:
            break
        try:
            tensors.append(preprocess(source.load(), preprocessing)[0])
        except GapError:
            continue
    return tensors

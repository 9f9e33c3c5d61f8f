"""The served models: the repository's entries, each loaded, compiled at its served shapes and warmed up."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..colors import heatmap_bytes_bound
from ..errors import UnknownModelError
from ..explainer import Explainer, ModelDescription
from ..repository import ModelEntry, find_model, load_repository
from ..runtime import RuntimeConfig
from .metrics import Metrics

log = logging.getLogger("gap_service.server")


@dataclass
class LoadedModel:
    """A model ready to serve: its explainer (inputs fixed to the served shapes) and its description."""

    entry: ModelEntry
    explainer: Explainer
    description: ModelDescription
    load_seconds: float

    @property
    def name(self) -> str:
        return self.entry.config.name

    def response_bytes_bound(self, max_nodes: int) -> int:
        """Largest Explain/Expand response for a tree of ``max_nodes`` nodes (every option on)."""
        height, width = self.description.input_hw
        per_map = 4 * self.description.max_map_elements
        per_node = per_map + heatmap_bytes_bound((height, width)) + 1024
        picture = height * width * 3 + 1024
        cams = 3 * (per_map + 256)
        return max_nodes * per_node + picture + cams + 2**20


def prepare_model(entry: ModelEntry, runtime: RuntimeConfig, max_image_pixels: int) -> LoadedModel:
    """Load and compile the model at its served input shapes (sessions come with ``warm_up``)."""
    started = time.perf_counter()
    explainer = entry.explainer(runtime, fixed_shapes=True, max_image_pixels=max_image_pixels)
    description = explainer.describe()
    return LoadedModel(entry, explainer, description, time.perf_counter() - started)


def warm_up(model: LoadedModel) -> None:
    """Build every session once (forward and each level pair of the default chain) and run them."""
    started = time.perf_counter()
    zeros = {spec.name: np.zeros(shape, dtype=spec.dtype) for spec, shape in model.description.inputs}
    model.explainer.explain(zeros, top_k=1, depth=len(model.description.default_layers))
    model.load_seconds += time.perf_counter() - started


class ModelStore:
    """The repository's models, loaded once at start."""

    def __init__(self, repository: str | Path, runtime: RuntimeConfig, names: Sequence[str] | None = None,
                 max_image_pixels: int = 40_000_000) -> None:
        entries = load_repository(repository)
        if names:
            missing = sorted(set(names) - set(entries))
            if missing:
                raise UnknownModelError(f"models {missing} are not in the repository {repository} (it has {sorted(entries)})")
            entries = {name: entries[name] for name in names}
        self.entries = entries
        self.runtime = runtime
        self.max_image_pixels = max_image_pixels
        self.prepared: dict[str, LoadedModel] = {}
        self.models: dict[str, LoadedModel] = {}  # prepared and warmed up: served

    def prepare_all(self) -> None:
        for name, entry in self.entries.items():
            self.prepared[name] = prepare_model(entry, self.runtime, self.max_image_pixels)

    def warm_all(self, metrics: Metrics | None = None, warmup: bool = True) -> None:
        for name, model in self.prepared.items():
            if warmup:
                warm_up(model)
            model.description = model.explainer.describe()  # now with the sessions' providers
            self.models[name] = model
            providers = model.description.providers
            if metrics is not None:
                metrics.model_load.labels(name).set(model.load_seconds)
                metrics.model_info.labels(name, str(model.entry.version), ",".join(providers)).set(1)
            log.info("model loaded", extra={"fields": {
                "model": name, "version": model.entry.version, "providers": providers,
                "load_seconds": round(model.load_seconds, 3),
                "inputs": {spec.name: list(shape) for spec, shape in model.description.inputs},
                "layers": list(model.description.default_layers),
            }})

    def get(self, name: str, version: int = 0) -> LoadedModel:
        entry = find_model(self.entries, name)
        if version and version != entry.version:
            state = "exists but is not served" if version in entry.versions else "does not exist"
            raise UnknownModelError(f"model '{name}' version {version} {state}; serving version {entry.version}")
        model = self.models.get(name)
        if model is None:
            raise UnknownModelError(f"model '{name}' is not loaded")
        return model

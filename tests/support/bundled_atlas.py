"""The bundled EfficientNet-Lite0 and its channel atlas, which scripts/setup.sh builds (not committed: 114 MiB)."""

from __future__ import annotations

import pytest

from gap_service.atlas import Atlas, AtlasNotFoundError
from gap_service.explainer import Explainer
from gap_service.repository import BUNDLED_REPOSITORY, ModelEntry, load_repository

MODEL = "efficientnet_lite0"


def bundled_model() -> ModelEntry:
    return load_repository(BUNDLED_REPOSITORY)[MODEL]


def bundled_atlas(explainer: Explainer) -> Atlas:
    """The model's atlas; its absence is a set-up step not taken, so a failure, not a skip."""
    try:
        return explainer.atlas(required=True)
    except AtlasNotFoundError as exc:
        pytest.fail(f"{exc}; bash scripts/setup.sh builds it (about 20 s)")

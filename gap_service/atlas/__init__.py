"""The channel atlas: for every layer and channel, the image patches where the channel is most active.

    atlas = build_atlas(explainer, reference_set(), preprocessing, out_dir, digest=file_digest(model_path))
    atlas = load_atlas(model_path)               # refused if built for another model file
    entry = atlas.entry(layer, channel)          # patches (pixels, boxes, activations) + statistics

See docs/atlas.md for the method and the on-disk format.
"""

from .build import Progress, build_atlas
from .images import ImageSource, folder_images, reference_set, with_crops
from .receptive import AxisField, NotAnalysable, ReceptiveField, receptive_fields
from .store import (Atlas, AtlasMismatchError, AtlasNotFoundError, ChannelEntry, ChannelStats, Patch, atlas_dir_for,
                    file_digest, load_atlas)

__all__ = [
    "Atlas", "AtlasMismatchError", "AtlasNotFoundError", "AxisField", "ChannelEntry", "ChannelStats", "ImageSource",
    "NotAnalysable", "Patch", "Progress", "ReceptiveField", "atlas_dir_for", "build_atlas", "file_digest",
    "folder_images", "load_atlas", "receptive_fields", "reference_set", "with_crops",
]

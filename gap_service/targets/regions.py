"""Seeds for a region of a dense output: a segmentation class map, a text-probability map (DBNet),
a depth map.

The decision is the sum of one channel's values over a region, ``<seed, output>`` with the seed
being the region's mask on that channel and zero elsewhere: pytorch-grad-cam's
``SemanticSegmentationTarget`` (``(model_output[category] * mask).sum()``). Without a box or a mask
the region is the whole map.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import invalid


def region_seed(output_shape: Sequence[int], channel: int, box: Sequence[float] | None = None,
                mask: np.ndarray | None = None, channel_axis: int = 1, field: str = "region") -> np.ndarray:
    """A float32 seed shaped like the output: ``mask`` (or the box's pixels, or 1 everywhere) on ``channel``.

    The output is ``[1, C, H, W]`` (``channel_axis=1``) or ``[1, H, W, C]`` (``channel_axis=3`` or -1).
    ``box`` is x1, y1, x2, y2 in the map's own pixels (columns, rows): it covers the pixels whose
    centres lie inside it, and may reach past the map's edges. ``mask`` is ``[H, W]``, boolean or
    weights. Errors name ``field``'s members (``region.box``; a request's ``options.target.region.box``).
    """
    shape = tuple(int(d) for d in output_shape)
    if len(shape) != 4 or shape[0] != 1:
        raise invalid(f"{field}.output", f"shape {list(shape)} is not a dense map [1, C, H, W] or [1, H, W, C]")
    if channel_axis not in (1, 3, -1):
        raise invalid(f"{field}.channel_axis", f"{channel_axis} is not 1 (NCHW) or 3 (NHWC)")
    axis = channel_axis % 4
    channels = shape[axis]
    height, width = (d for i, d in enumerate(shape) if i not in (0, axis))
    if not 0 <= channel < channels:
        raise invalid(f"{field}.channel", f"{channel} is out of range: the output has {channels} channels")
    if box is not None and mask is not None:
        raise invalid(field, "give a box or a mask, not both")
    if mask is not None:
        region = _checked_mask(mask, (height, width), field)
    elif box is not None:
        region = _box_mask(box, (height, width), field)
    else:
        region = np.ones((height, width), np.float32)
    seed = np.zeros(shape, np.float32)
    if axis == 1:
        seed[0, channel] = region
    else:
        seed[0, :, :, channel] = region
    return seed


def _checked_mask(mask: np.ndarray, hw: tuple[int, int], field: str) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.shape != hw:
        raise invalid(f"{field}.mask", f"shape {list(mask.shape)} must be the map's [H, W] = {list(hw)}")
    if mask.dtype != bool and not np.issubdtype(mask.dtype, np.number):
        raise invalid(f"{field}.mask", f"dtype {mask.dtype} is not boolean or numeric")
    values = mask.astype(np.float32)
    if not np.isfinite(values).all():
        raise invalid(f"{field}.mask", "holds NaN or infinite values")
    if not values.any():
        raise invalid(f"{field}.mask", "is zero everywhere: it selects nothing to explain")
    return values


def _box_mask(box: Sequence[float], hw: tuple[int, int], field: str) -> np.ndarray:
    values = np.asarray(box, np.float64)
    if values.shape != (4,) or not np.isfinite(values).all():
        raise invalid(f"{field}.box", f"{list(np.ravel(values))} is not four finite numbers x1, y1, x2, y2")
    x1, y1, x2, y2 = values
    height, width = hw
    # pixel j is covered when x1 <= j + 0.5 < x2, i.e. j in [ceil(x1 - 0.5), ceil(x2 - 0.5))
    left, top = (max(0, int(np.ceil(v - 0.5))) for v in (x1, y1))
    right, bottom = min(width, int(np.ceil(x2 - 0.5))), min(height, int(np.ceil(y2 - 0.5)))
    if left >= right or top >= bottom:
        raise invalid(f"{field}.box", f"[{x1:g}, {y1:g}, {x2:g}, {y2:g}] covers no pixel of the {width}x{height} map")
    region = np.zeros(hw, np.float32)
    region[top:bottom, left:right] = 1
    return region

"""Tests of :mod:`gap_service.colors`: one colour map for every heatmap, and its PNG encoding."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

from gap_service.colors import (TURBO, colorbar, colorize, colormap, data_uri, heatmap_bytes_bound, heatmap_png,
                                normalize)
from gap_service.report import heatmap_overlay

PALETTE = {tuple(int(v) for v in rgb) for rgb in colormap(np.linspace(0.0, 1.0, 256, dtype=np.float32))}


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    assert image.format == "PNG"
    return image


def test_heatmap_png_is_an_rgb_png_of_the_asked_size_in_the_project_colours() -> None:
    values = np.random.default_rng(0).uniform(-0.2, 3.0, (3, 5)).astype(np.float32)
    image = decode(heatmap_png(values, (24, 40)))
    assert image.mode == "RGB" and image.size == (40, 24)  # size is (height, width), PIL reports (w, h)
    pixels = np.asarray(image).reshape(-1, 3)
    assert {tuple(int(v) for v in p) for p in pixels} <= PALETTE
    hottest = tuple(int(v) for v in np.rint(TURBO[-1]))
    coldest = tuple(int(v) for v in np.rint(TURBO[0]))
    assert hottest in {tuple(p) for p in pixels.tolist()}  # scaled by its maximum: the peak is the hot end
    assert coldest in {tuple(p) for p in pixels.tolist()}  # negative evidence is no evidence


def test_heatmap_png_of_an_empty_or_non_finite_map_is_the_cold_end() -> None:
    coldest = np.rint(TURBO[0]).astype(np.uint8)
    for values in (np.zeros((2, 2)), np.full((2, 2), -1.0), np.array([[np.nan, 0.0], [0.0, np.nan]])):
        pixels = np.asarray(decode(heatmap_png(values, (4, 4))))
        assert (pixels == coldest).all()


def test_heatmap_bytes_bound_holds_for_incompressible_maps() -> None:
    for size in ((1, 1), (48, 320), (224, 224)):
        noise = np.random.default_rng(1).uniform(0, 1, size).astype(np.float32)
        assert len(heatmap_png(noise, size)) <= heatmap_bytes_bound(size)


def test_report_overlays_and_server_heatmaps_use_the_same_colours() -> None:
    """At full opacity and full heat an overlay pixel is exactly the heatmap's colour."""
    heat = np.zeros((8, 8), np.float32)
    heat[2, 3] = 5.0
    overlay = heatmap_overlay(np.zeros((8, 8, 3), np.uint8), heat, alpha=1.0)
    served = np.asarray(decode(heatmap_png(heat, (8, 8))))
    np.testing.assert_array_equal(overlay[2, 3], served[2, 3])
    np.testing.assert_array_equal(colorbar(width=256, height=1)[0], colormap(np.linspace(0, 1, 256)))


def test_colorize_spans_the_turbo_anchors_and_clips() -> None:
    np.testing.assert_allclose(colorize(np.array([0.0, 1.0])), TURBO[[0, -1]])
    np.testing.assert_array_equal(colorize(np.array([-3.0, 7.0, np.nan])), colorize(np.array([0.0, 1.0, 0.0])))


def test_normalize_scales_by_the_maximum_and_treats_negatives_as_no_evidence() -> None:
    np.testing.assert_allclose(normalize(np.array([[-1.0, 1.0], [2.0, 4.0]])), [[0.0, 0.25], [0.5, 1.0]])
    np.testing.assert_array_equal(normalize(np.zeros((2, 2))), np.zeros((2, 2)))


def test_data_uri_carries_the_png() -> None:
    rgb = colorbar(width=16, height=2)
    uri = data_uri(rgb)
    assert uri.startswith("data:image/png;base64,")
    np.testing.assert_array_equal(np.asarray(decode(base64.b64decode(uri.split(",", 1)[1]))), rgb)

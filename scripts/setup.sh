#!/usr/bin/env bash
# Creates .venv and installs gap-service with the extras given (default: cpu).
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-cpu}"
python3 -m venv .venv 2>/dev/null || python3 -m venv --without-pip .venv
if [ ! -x .venv/bin/pip ]; then .venv/bin/python -m ensurepip --upgrade >/dev/null; fi
stamp=".venv/.installed-$(echo "$extras" | tr ',' '-')-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e ".[${extras}]"
  touch "$stamp"
fi
# The bundled ImageNet model's channel atlas (docs/atlas.md), whose patches the reports show per
# node: about 114 MiB, so built here (about 20 s) rather than committed, and rebuilt only when it is
# missing or was built for another model file (digest). Skipped where the repository's models and
# photos are absent (the Docker build stage: the models are a volume there).
atlas_model=models/efficientnet_lite0/1
if [ -f "$atlas_model/model.onnx" ] && [ -d examples/photos ] && ! .venv/bin/python -c \
    'import sys; from gap_service.atlas import load_atlas; load_atlas(sys.argv[1])' "$atlas_model" 2>/dev/null; then
  echo "setup: building the channel atlas of efficientnet_lite0 (docs/atlas.md)"
  .venv/bin/gap-service atlas efficientnet_lite0 --effective 0.5
fi

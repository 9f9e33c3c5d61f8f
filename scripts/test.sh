#!/usr/bin/env bash
# Runs every test (slow ones included) after installing what they need.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh cpu,test
exec .venv/bin/python -m pytest -q "$@"

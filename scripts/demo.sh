#!/usr/bin/env bash
# Quick start: set up .venv (idempotent) and run the assistant node on its embedded offline
# demo model with a synthetic camera. Extra arguments go to `vlm-ros node`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/vlm-ros node --demo "$@"

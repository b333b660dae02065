#!/usr/bin/env bash
# Installs what is missing, then runs the whole test suite (the end-to-end Triton tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m pytest -q "$@" tests

#!/usr/bin/env bash
# The whole pipeline on embedded defaults: train MRKD on real ELPV solar cells, evaluate, export to the Triton
# model repository, serve, stream the held-out cells through the multi-camera client, stop the server.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/python -m mrkd.demo "$@"

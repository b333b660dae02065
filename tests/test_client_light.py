"""The client without torch: `client` imports neither torch nor torchvision, its image steps give the pixels the
server's preprocessing gets, and requirements-client.txt alone (a fresh virtual environment) runs it against a real
tritonserver."""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "torchvision")

# Imports every module of the client package and uses each image step it has (decode, RGB, heat-map overlay PNG,
# dashboard thumbnail), then prints the heavy modules that got imported.
PROBE = """\
import importlib, json, pkgutil, sys, tempfile
import numpy as np
import client
for info in pkgutil.walk_packages(client.__path__, "client."):
    importlib.import_module(info.name)
from client.dashboard.images import thumbnail_jpeg
from client.inspection import encode_image
from client.results import save_heatmap_overlay
from client.sources import FolderSource
from mrkd.core.images import decode_image
image = np.random.default_rng(0).integers(0, 256, (40, 60), dtype=np.uint8)
decode_image(encode_image(np.repeat(image[:, :, None], 3, axis=2), "png"))
thumbnail_jpeg(image, np.random.default_rng(1).random((8, 8)).astype(np.float32), width=32)
save_heatmap_overlay(tempfile.mkdtemp(), "cam", 0, image, np.zeros((8, 8), np.float32))
print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))
"""


def run_probe(python: str | Path) -> list[str]:
    done = subprocess.run([str(python), "-c", PROBE.replace("{HEAVY!r}", repr(HEAVY))], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_client_imports_neither_torch_nor_torchvision():
    """Seen failing before mrkd.core.images: sources, inspection and the dashboard imported mrkd.core.preprocess."""
    assert run_probe(sys.executable) == []


def test_the_image_modules_that_the_client_uses_stay_torch_free():
    """mrkd, mrkd.core and mrkd.core.images import nothing heavy (the client depends on exactly these)."""
    code = "import sys, mrkd, mrkd.core, mrkd.core.images, mrkd.runtime.visualize; " \
           f"print([m for m in {HEAVY!r} if m in sys.modules])"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _images() -> dict[str, Image.Image]:
    rng = np.random.default_rng(7)
    rgb = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, (37, 53), dtype=np.uint8)
    rgba = np.dstack([rgb, rng.integers(0, 256, (37, 53), dtype=np.uint8)])
    palette = Image.fromarray(rgb).quantize(colors=17)
    return {
        "rgb": Image.fromarray(rgb),
        "gray": Image.fromarray(gray),
        "gray_alpha": Image.fromarray(np.dstack([gray, gray[::-1]])),
        "rgba": Image.fromarray(rgba),
        "palette": palette,
    }


@pytest.mark.parametrize("kind", list(_images()))
def test_client_decoding_gives_the_pixels_of_an_independent_decoder(kind: str):
    """The client's torch-free decode (PIL + numpy) against torchvision's own PNG decoder (libpng) in RGB mode."""
    import torch
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_image as tv_decode

    from mrkd.core.images import decode_image

    data = _png(_images()[kind])
    reference = tv_decode(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    np.testing.assert_array_equal(decode_image(data), reference.permute(1, 2, 0).numpy())


def test_server_preprocessing_of_the_client_frame_is_that_of_the_file():
    """A gray frame the client sends raw (to_rgb, numpy) is prepared by the server exactly as the server prepares
    the encoded file (decode_image in the preprocess model): the raw and bytes transports see the same pixels."""
    from mrkd.core.images import to_rgb
    from mrkd.core.preprocess import decode_image as server_decode
    from mrkd.core.preprocess import prepare_image

    gray = _images()["gray"]
    client_frame = to_rgb(np.asarray(gray))
    assert client_frame.shape == (37, 53, 3) and np.all(client_frame[:, :, 0] == client_frame[:, :, 2])
    from_file = prepare_image(server_decode(_png(gray)), 32)
    np.testing.assert_array_equal(prepare_image(client_frame, 32).numpy(), from_file.numpy())


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            name, version = line.split("==")
            pins[re.sub(r"\[.*\]", "", name).lower()] = version
    return pins


def test_client_requirements_are_the_pins_of_the_full_environment_without_torch():
    client, full = _pins(REPO_ROOT / "requirements-client.txt"), _pins(REPO_ROOT / "requirements.txt")
    assert not set(client) & {"torch", "torchvision", "scikit-image", "scipy"}
    assert {name: full.get(name) for name in client} == client


@pytest.mark.triton
@pytest.mark.slow
def test_fresh_client_only_environment_runs_the_client_against_a_real_tritonserver(served_model, tmp_path: Path):
    """Builds a virtual environment from requirements-client.txt alone (pip, the registry or pip's cache), checks
    that torch cannot even be imported there, and runs `python -m client` from the checkout on real ELPV cells:
    every frame answered, with the scores the full environment's client gets from the same server."""
    import elpv_dataset

    venv = tmp_path / "client-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "-r",
                              str(REPO_ROOT / "requirements-client.txt")], capture_output=True, text=True, timeout=1200)
    assert install.returncode == 0, install.stderr[-3000:]
    assert subprocess.run([str(python), "-c", "import torch"], capture_output=True).returncode != 0
    assert run_probe(python) == []

    cells = sorted((Path(elpv_dataset.__file__).parent / "data" / "images").glob("*.png"))[:6]
    folder = tmp_path / "cells"
    folder.mkdir()
    for cell in cells:
        shutil.copy(cell, folder / cell.name)

    def run_client(python_exe: str | Path, out: Path) -> list[dict]:
        started = time.monotonic()
        done = subprocess.run(
            [str(python_exe), "-m", "client", "--url", served_model.grpc_url, "--model", served_model.model_name,
             "--camera", f"cam={folder}", "--out", str(out), "--progress", "none"],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        )
        assert done.returncode == 0, done.stderr[-3000:]
        print(f"{python_exe}: client run {time.monotonic() - started:.1f} s")
        return [json.loads(line) for line in out.read_text().splitlines()]

    light = run_client(python, tmp_path / "light.jsonl")
    full = run_client(sys.executable, tmp_path / "full.jsonl")
    assert [r["status"] for r in light] == ["ok"] * len(cells)

    def by_frame(records: list[dict]) -> list[tuple]:
        # Results are written as answers come back (up to --max-in-flight requests at once), so the order of the
        # lines is not the order of the frames: compare frame by frame.
        return sorted((r["frame"], r["source"], r["score"], r["verdict"]) for r in records)

    assert by_frame(light) == by_frame(full)
    assert [row[1] for row in by_frame(light)] == [c.name for c in cells]
    print(f"client-only environment: {_du(venv) / 2**20:.0f} MiB")


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())

"""The package layout of docs/DESIGN.md: imports only point down, and no module imports a command."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "mrkd"
COMMANDS = {"train", "evaluate", "export", "serve", "demo"}
# layer -> the mrkd layers it may import (besides itself)
ALLOWED = {
    "core": set(),
    "ops": {"_C"},
    "model": {"core"},
    "data": {"core"},
    "runtime": {"core", "model", "data", "ops"},
    "triton": {"core", "runtime"},
    "__init__": {"core", "runtime"},
}


def _layer(module: str) -> str:
    """'mrkd.runtime.detector' -> 'runtime'; 'mrkd.train' -> 'train'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _mrkd_imports(path: Path) -> set[str]:
    """Absolute names of every mrkd module `path` imports (relative imports resolved), lazy imports included."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "mrkd")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "mrkd":
                continue
            if node.module is None or target == "mrkd":  # from . import x / from mrkd import x: submodules
                found.update(f"{target}.{alias.name}" for alias in node.names)
            else:
                found.add(target)
    return found


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_imports_point_down(path: Path):
    own = _layer(_module_name(path))
    for imported in _mrkd_imports(path):
        target = _layer(imported)
        assert target not in COMMANDS, f"{path.name} imports the command module {imported}"
        if own in COMMANDS or target == own:
            continue
        assert target in ALLOWED[own], f"{_module_name(path)} ({own}) may not import {imported} ({target})"


def test_layout_checker_sees_a_violation(tmp_path):
    """The checker itself: a relative import that reaches up is found and resolved to its layer."""
    fake = PACKAGE / "model" / "_layout_probe.py"
    fake.write_text("from ..runtime import detector\nfrom .. import train\n")
    try:
        imported = _mrkd_imports(fake)
    finally:
        fake.unlink()
    assert {_layer(m) for m in imported} == {"runtime", "train"}
    assert "runtime" not in ALLOWED["model"]


def test_top_level_is_commands_and_public_api():
    top = {p.stem for p in PACKAGE.glob("*.py")}
    assert top == COMMANDS | {"__init__", "ops"}
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert packages == {"core", "model", "data", "runtime", "triton"}


# one file per concern: the modules each package must hold (the split of docs/DESIGN.md)
MODULES = {
    "core": {"config", "errors", "files", "images", "options", "preprocess", "wire"},
    "runtime": {"calibration", "checkpoint", "convert", "detector", "errors", "evaluation", "metrics",
                "network_export", "network_runtime", "reference", "runners", "training", "visualize",
                "weights", "whitening"},
    "triton": {"configs", "errors", "launcher", "models", "publish", "repository"},
}


@pytest.mark.parametrize("package", sorted(MODULES))
def test_packages_hold_their_modules(package: str):
    assert {p.stem for p in (PACKAGE / package).glob("*.py")} - {"__init__"} == MODULES[package]


CLIENT_MODULES = {"_shm", "cli", "discovery", "events", "frame_queue", "inspection", "mqtt", "mqtt_cli", "plant",
                  "products", "progress", "redact", "results", "run_options", "runner", "servers", "settings",
                  "sources", "spool", "stats"}


def test_client_holds_its_modules():
    """The client split by job (as tritonclient's grpc/): results file, statistics, terminal display, shared
    memory, each in its own module."""
    client = PACKAGE.parent / "client"
    assert {p.stem for p in client.glob("*.py")} - {"__init__", "__main__"} == CLIENT_MODULES


def test_wire_contract_imports_without_torch():
    """The client imports mrkd.core.wire (and mrkd.core.errors): neither may pull in torch or tritonserver."""
    code = ("import sys, mrkd.core.wire, mrkd.core.errors, mrkd.core.options; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'tritonclient', "
            "'triton_python_backend_utils')))")
    result = subprocess.run([sys.executable, "-c", code], cwd=PACKAGE.parent, capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "[]", result.stdout

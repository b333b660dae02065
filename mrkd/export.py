"""python -m mrkd.export: a trained checkpoint -> a new version of a product's models in a Triton model repository.

Examples:
  python -m mrkd.export --checkpoint runs/elpv-mono/checkpoint.pt --repo model_repository
  python -m mrkd.export --checkpoint runs/elpv-mono/checkpoint.pt --repo model_repository --runtime openvino
  python -m mrkd.export --checkpoint CKPT --repo model_repository --runtime openvino --precision bf16 --recalibrate
  python -m mrkd.export --checkpoint runs/bottle/checkpoint.pt --repo model_repository --name bottle --device gpu

Naming: product NAME (default "mrkd") owns six models in the repository:
  NAME                    ensemble, input IMAGE (encoded JPEG/PNG/BMP bytes, TYPE_STRING [1])
  NAME_raw                ensemble, input FRAME (decoded UINT8 [H, W, 3] frames)
  NAME_preprocess         python: decode + grayscale->3ch + resize -> PREPARED uint8 [3, S, S]
  NAME_frame_preprocess   python: the same for decoded frames
  NAME_detector           python: teacher + bottleneck + student + fused anomaly map (dynamic batching)
  NAME_postprocess        python: calibration -> SCORE, IS_ANOMALOUS, ANOMALY_MAP
Both ensembles answer SCORE (FP32 [1]), RAW_SCORE (FP32 [1]), IS_ANOMALOUS (BOOL [1]) and ANOMALY_MAP ([M, M],
FP16 or UINT8 with 255 = 1.0). The version folder of NAME_detector holds the checkpoint, that of NAME_postprocess
its calibration. model.py files are one-line imports of mrkd.triton.models, so the code lives once, in the package.

One export is one version of all six models, every config pinned to it, published all at once after everything was
written and synced: a failed or interrupted export leaves the previous version served whole, and two exports at the
same time get two versions (mrkd/triton/repository.py says how).

Runtime of the detector network (--runtime): onnxruntime (the CPU default: the fastest exact one measured here),
openvino or torch (the GPU default). The network is exported as network.onnx (and OpenVINO IR network.xml/.bin for
openvino) into the detector's version folder, checked against torch on the spot: the max relative error is printed
and an fp32 network above 1e-4 is refused. --precision bf16 (openvino or torch, opt-in) is scored next to fp32 on
real images (the checkpoint's test split, or --calibration-images) and refused when more than 0.5% of the verdicts
change, unless --recalibrate fits the threshold to the bf16 scores.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

from .core.config import ModelConfig
from .core.options import add_options, from_args, option, run_command
from .triton.configs import ExportOptions
from .triton.errors import ExportError
from .triton.repository import export, write_configs


@dataclass
class ExportCommand:
    """The command's options besides ExportOptions: what to export, where, and the templates-only mode."""

    checkpoint: str | None = option(None, help="trained checkpoint (file, or run folder with checkpoint.pt)")
    repo: str = option(None, required=True, help="Triton model repository folder")
    version: int | None = option(None, type=int, help="version number (default: the next free one)")
    configs_only: bool = option(
        False, action="store_true",
        help="write only the config.pbtxt templates (no checkpoint; image size from --image-size)")
    image_size: int = option(ModelConfig().image_size, type=int, help="with --configs-only")


FIRST = ("checkpoint", "repo", "name", "version")  # the order of --help: these first, then as declared


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The parsed arguments (both option dataclasses' fields)."""
    p = argparse.ArgumentParser(prog="python -m mrkd.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_options(p, ExportOptions, ExportCommand, first=FIRST)
    return p.parse_args(argv)


def options_from_args(args: argparse.Namespace) -> ExportOptions:
    """ExportOptions from the parsed arguments, device "auto" resolved (gpu when this machine has CUDA)."""
    opts = from_args(ExportOptions, args)
    if opts.device == "auto":
        import torch

        opts = dataclasses.replace(opts, device="gpu" if torch.cuda.is_available() else "cpu")
    return opts


def main(argv: list[str] | None = None) -> int:
    """Runs the command on `argv` (default: sys.argv); returns its exit status."""
    args = parse_args(argv)
    command = from_args(ExportCommand, args)
    return run_command(lambda: run(command, options_from_args(args)), ExportCommand, ExportOptions)


def run(command: ExportCommand, opts: ExportOptions) -> int:
    """Exports (or writes the templates) and prints what was done."""
    if command.configs_only:
        names = write_configs(Path(command.repo), command.image_size, opts)
        print(f"wrote config templates for {', '.join(names.values())} in {command.repo}")
        return 0
    if not command.checkpoint:
        raise ExportError("checkpoint is required (or configs_only)", "checkpoint", "configs_only")
    result = export(command.checkpoint, command.repo, opts, version=command.version)
    print(f"exported {command.checkpoint} as version {result.version} of "
          f"{', '.join(result.models.values())} in {result.repo} ({opts.device}, map {opts.map_size}px "
          f"{opts.map_dtype}, max batch {opts.max_batch_size})")
    network = result.network
    if network is not None:
        line = f"detector network: {network.runtime} {network.precision}"
        if network.manifest is not None:
            line += (f", max relative error vs torch {network.manifest.max_relative_error:.1e} (features), "
                     f"{network.manifest.score_relative_error:.1e} (scores)")
        print(line)
        if network.precision_report is not None:
            print(f"precision check: {network.precision_report.summary()}")
    print(f"serve it: python -m mrkd.serve --repo {result.repo}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

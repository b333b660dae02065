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
import sys
from pathlib import Path

from .core.config import ModelConfig
from .runtime.network_runtime import DEFAULT_CPU_RUNTIME, PRECISIONS, RUNTIMES
from .triton.models import MAP_DTYPES
from .triton.repository import DEFAULT_NAME, ExportError, ExportOptions, export, write_configs


# ---------------------------------------------------------------------------------------------------------- CLI


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m mrkd.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="trained checkpoint (file, or run folder with checkpoint.pt)")
    p.add_argument("--repo", required=True, help="Triton model repository folder")
    p.add_argument("--name", default=DEFAULT_NAME, help="product name; prefixes the model names (default: mrkd)")
    p.add_argument("--version", type=int, help="version number (default: the next free one)")
    p.add_argument("--device", choices=["cpu", "gpu", "auto"], default="auto",
                   help="where the detector runs (auto: gpu if this machine has CUDA)")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--map-size", type=int, default=64, help="ANOMALY_MAP resolution (default 64)")
    p.add_argument("--map-dtype", choices=sorted(MAP_DTYPES), default="fp16")
    p.add_argument("--instances", type=int, default=1, help="detector instances")
    p.add_argument("--threads", "--torch-threads", dest="torch_threads", type=int, default=0, metavar="N",
                   help="threads per detector instance on CPU, for every runtime (0 = cores / instances)")
    p.add_argument("--runtime", choices=["auto", *RUNTIMES], default="auto",
                   help=f"detector network runtime (auto: {DEFAULT_CPU_RUNTIME} on cpu, torch on gpu)")
    p.add_argument("--precision", choices=["auto", *PRECISIONS], default="auto",
                   help="network precision (auto: fp32 on cpu, bf16 autocast on gpu); bf16 on cpu is checked "
                        "on real images")
    p.add_argument("--calibration-images", metavar="DIR",
                   help="normal images of the product for the bf16 check (default: the checkpoint's data)")
    p.add_argument("--recalibrate", action="store_true",
                   help="bf16: fit the threshold to the bf16 scores instead of refusing a model whose verdicts change")
    p.add_argument("--preprocess-instances", type=int, default=1)
    p.add_argument("--max-queue-delay-us", type=int, default=ExportOptions.max_queue_delay_us)
    p.add_argument("--preferred-batch-sizes", type=_int_list, default=[], help="e.g. 4,8,16")
    p.add_argument("--warmup-batch-sizes", type=_int_list, default=[1], help="detector warm-up (default 1)")
    p.add_argument("--configs-only", action="store_true",
                   help="write only the config.pbtxt templates (no checkpoint; image size from --image-size)")
    p.add_argument("--image-size", type=int, default=ModelConfig().image_size, help="with --configs-only")
    return p.parse_args(argv)


def options_from_args(args: argparse.Namespace) -> ExportOptions:
    device = args.device
    if device == "auto":
        import torch

        device = "gpu" if torch.cuda.is_available() else "cpu"
    return ExportOptions(
        name=args.name, device=device, max_batch_size=args.max_batch_size, map_size=args.map_size,
        map_dtype=args.map_dtype, instances=args.instances, torch_threads=args.torch_threads,
        preprocess_instances=args.preprocess_instances, max_queue_delay_us=args.max_queue_delay_us,
        preferred_batch_sizes=args.preferred_batch_sizes, warmup_batch_sizes=args.warmup_batch_sizes,
        runtime=args.runtime, precision=args.precision, calibration_images=args.calibration_images,
        recalibrate=args.recalibrate,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        opts = options_from_args(args)
        if args.configs_only:
            names = write_configs(Path(args.repo), args.image_size, opts)
            print(f"wrote config templates for {', '.join(names.values())} in {args.repo}")
            return 0
        if not args.checkpoint:
            raise ExportError("--checkpoint is required (or --configs-only)")
        result = export(args.checkpoint, args.repo, opts, version=args.version)
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"exported {args.checkpoint} as version {result.version} of "
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

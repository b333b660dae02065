"""Fused anomaly-map op vs the eager reference vs a naive 2-D-convolution blur, in one run.

    python benchmarks/anomaly_map.py --device cpu --dtype float32 --batches 1,16,64 --repeats 5 [--json out.json]
    python benchmarks/anomaly_map.py --pool 3 --batches 1,16   # also the k x k feature mean the product applies first

Shapes: wide_resnet50_2 features at 256 px (256x64x64, 512x32x32, 1024x16x16), out_size 256x256, sigma 4.
Prints ms per image, the speed-up ratios, and feature bytes read per second against a memory-read bandwidth
measured in the same run (CPU: summing a tensor of the same size; CUDA: device-to-device copy).
With --pool K, a second table: mrkd.ops.local_average (the K x K feature mean before the distance) against
F.avg_pool2d(count_include_pad=False), and a map whose score reads the same taps summed while the map multiplies
them (`--preset quality`) as one call of mrkd.ops.anomaly_map (each tap averaged once) against the map and the
score made by two calls (each averaging the taps itself).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from mrkd import ops  # noqa: E402

WRN50_256PX_SHAPES = [(256, 64, 64), (512, 32, 32), (1024, 16, 16)]
OUT_SIZE = (256, 256)
SIGMA = 4.0
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def naive_2d_blur_anomaly_map(teacher, student, out_size, sigma):
    """What peer code does: the same eager steps, but a full (2r+1)^2 Gaussian kernel in one conv2d."""
    maps = ops._distance_sum(teacher, student, out_size)
    radius = ops.gaussian_radius(sigma)
    if radius > 0:
        k1 = ops.gaussian_kernel1d(sigma, maps.device)
        maps = F.conv2d(ops.reflect_pad(maps, radius), torch.outer(k1, k1)[None, None])
    return maps, maps.flatten(1).amax(dim=1)


@dataclass
class Row:
    batch: int
    fused_ms_per_image: float
    reference_ms_per_image: float
    naive2d_ms_per_image: float
    fused_vs_reference: float
    fused_vs_naive2d: float
    feature_mb_per_image: float
    fused_feature_gb_per_s: float
    measured_bandwidth_gb_per_s: float
    fused_fraction_of_bandwidth: float


def synchronize(device: torch.device) -> None:
    """Waits for the device's queued work (CUDA), so that a timer measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median seconds per call (after one warm-up); CUDA events on GPU."""
    fn()
    synchronize(device)
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def measure_bandwidth(nbytes: int, dtype: torch.dtype, device: torch.device, repeats: int) -> float:
    """Bytes/s: CPU reads (sum of a same-size tensor); CUDA device-to-device copy (bytes read)."""
    numel = nbytes // torch.empty((), dtype=dtype).element_size()
    source = torch.randn(numel, device=device).to(dtype)
    if device.type == "cuda":
        target = torch.empty_like(source)
        seconds = time_call(lambda: target.copy_(source), device, repeats)
    else:
        seconds = time_call(lambda: source.sum(dtype=torch.float32), device, repeats)
    return nbytes / seconds


def make_features(batch: int, dtype: torch.dtype, device: torch.device):
    """Seeded teacher and student features of the benchmarked shapes for one batch."""
    g = torch.Generator(device=device).manual_seed(0)
    teacher = [torch.randn(batch, *s, generator=g, device=device).to(dtype) for s in WRN50_256PX_SHAPES]
    student = [(t.float() + 0.3 * torch.randn(t.shape, generator=g, device=device)).to(dtype) for t in teacher]
    return teacher, student


def bench_batch(batch: int, dtype: torch.dtype, device: torch.device, repeats: int, slow_repeats: int) -> Row:
    """Times the fused operator and the eager references on one batch size, side by side."""
    teacher, student = make_features(batch, dtype, device)
    feature_bytes = sum(t.numel() * t.element_size() for t in teacher + student)
    fused = time_call(lambda: ops.anomaly_map(teacher, student, OUT_SIZE, SIGMA), device, repeats)
    reference = time_call(lambda: ops.anomaly_map_reference(teacher, student, OUT_SIZE, SIGMA), device, slow_repeats)
    with torch.no_grad():
        naive = time_call(lambda: naive_2d_blur_anomaly_map(teacher, student, OUT_SIZE, SIGMA), device, slow_repeats)
    bandwidth = measure_bandwidth(feature_bytes, dtype, device, repeats)
    fused_rate = feature_bytes / fused
    return Row(
        batch=batch,
        fused_ms_per_image=fused * 1e3 / batch,
        reference_ms_per_image=reference * 1e3 / batch,
        naive2d_ms_per_image=naive * 1e3 / batch,
        fused_vs_reference=reference / fused,
        fused_vs_naive2d=naive / fused,
        feature_mb_per_image=feature_bytes / batch / 1e6,
        fused_feature_gb_per_s=fused_rate / 1e9,
        measured_bandwidth_gb_per_s=bandwidth / 1e9,
        fused_fraction_of_bandwidth=fused_rate / bandwidth,
    )


@dataclass
class PoolRow:
    batch: int
    pool: int
    local_average_ms_per_image: float
    avg_pool2d_ms_per_image: float
    local_average_vs_avg_pool2d: float
    map_and_score_one_call_ms_per_image: float
    map_and_score_two_calls_ms_per_image: float
    one_call_vs_two_calls: float


def bench_pool(batch: int, pool: int, dtype: torch.dtype, device: torch.device, repeats: int) -> PoolRow:
    """The feature mean and the map + score of `--preset quality` (product map, summed score, same taps)."""
    teacher, student = make_features(batch, dtype, device)

    def torch_pool() -> list[torch.Tensor]:
        return [F.avg_pool2d(f, pool, stride=1, padding=pool // 2, count_include_pad=False) for f in teacher + student]

    ours = time_call(lambda: ops.local_average(teacher + student, pool), device, repeats)
    theirs = time_call(torch_pool, device, repeats)
    one = time_call(lambda: ops.anomaly_map(teacher, student, OUT_SIZE, SIGMA, pool=pool, score_scales=(0, 1, 2),
                                            combine="product"), device, repeats)
    two = time_call(lambda: (ops.anomaly_map(teacher, student, OUT_SIZE, SIGMA, pool=pool, combine="product"),
                             ops.anomaly_map(teacher, student, OUT_SIZE, SIGMA, pool=pool)), device, repeats)
    return PoolRow(batch, pool, ours * 1e3 / batch, theirs * 1e3 / batch, theirs / ours, one * 1e3 / batch,
                   two * 1e3 / batch, two / one)


def write_json_atomic(path: Path, payload: dict) -> None:
    """Writes the results as JSON atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=2)
    os.replace(tmp, path)


def main() -> None:
    """Parses the options, runs every batch size and prints (and saves) the ratios."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--batches", default="1,16,64", help="comma-separated batch sizes")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls of the fused op and the bandwidth probe")
    parser.add_argument("--slow-repeats", type=int, default=2, help="timed calls of the eager versions")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--pool", type=int, default=0,
                        help="also time the K x K feature mean and the pooled map + score (odd K; 0 = skip)")
    args = parser.parse_args()
    if not ops.native_available():
        parser.error("mrkd._C is not built (python setup.py build_ext --inplace); nothing native to time")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    if not batches or min(batches) < 1:
        parser.error(f"--batches must be positive integers, got {args.batches!r}")
    if args.pool and (args.pool < 3 or args.pool % 2 == 0):
        parser.error(f"--pool must be an odd size >= 3 (or 0 to skip), got {args.pool}")
    dtype = DTYPES[args.dtype]
    probe = "device-to-device copy" if device.type == "cuda" else "sum of a same-size tensor"
    print(f"device={device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
          f"dtype={args.dtype}, threads={torch.get_num_threads()}, bandwidth probe: {probe}")
    header = (f"{'batch':>5} {'fused ms/img':>12} {'eager ms/img':>12} {'2-D ms/img':>11} {'x eager':>8} "
              f"{'x 2-D':>7} {'feat GB/s':>9} {'probe GB/s':>10} {'% probe':>7}")
    print(header)
    rows = []
    for batch in batches:
        row = bench_batch(batch, dtype, device, args.repeats, args.slow_repeats)
        rows.append(row)
        print(f"{row.batch:>5} {row.fused_ms_per_image:>12.3f} {row.reference_ms_per_image:>12.3f} "
              f"{row.naive2d_ms_per_image:>11.3f} {row.fused_vs_reference:>8.1f} {row.fused_vs_naive2d:>7.1f} "
              f"{row.fused_feature_gb_per_s:>9.2f} {row.measured_bandwidth_gb_per_s:>10.2f} "
              f"{100 * row.fused_fraction_of_bandwidth:>6.0f}%", flush=True)
    pool_rows = []
    if args.pool:
        print(f"\n{'batch':>5} {'mean ms/img':>11} {'avg_pool2d':>10} {'x':>5} "
              f"{'map+score 1 call':>16} {'2 calls':>8} {'x':>5}   (feature mean {args.pool}x{args.pool})")
        for batch in batches:
            row = bench_pool(batch, args.pool, dtype, device, args.repeats)
            pool_rows.append(row)
            print(f"{row.batch:>5} {row.local_average_ms_per_image:>11.3f} {row.avg_pool2d_ms_per_image:>10.3f} "
                  f"{row.local_average_vs_avg_pool2d:>5.1f} {row.map_and_score_one_call_ms_per_image:>16.3f} "
                  f"{row.map_and_score_two_calls_ms_per_image:>8.3f} {row.one_call_vs_two_calls:>5.2f}", flush=True)
    if args.json:
        write_json_atomic(args.json, {
            "device": str(device), "dtype": args.dtype, "threads": torch.get_num_threads(),
            "bandwidth_probe": probe, "torch": torch.__version__, "rows": [asdict(r) for r in rows],
            "pool_rows": [asdict(r) for r in pool_rows],
        })
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

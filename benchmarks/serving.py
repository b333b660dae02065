"""Network runtimes side by side, in-process and through Triton, on the same MRKD model in one run.

  python benchmarks/serving.py                                   # random-weights mobilenet_v2, 256 px, CPU
  python benchmarks/serving.py --checkpoint runs/elpv-mono/checkpoint.pt --seconds 20
  python benchmarks/serving.py --runtimes torch,onnxruntime,openvino,openvino:bf16 --concurrency 1,8,32
  python benchmarks/serving.py --backbone wide_resnet50_2 --device gpu --runtimes torch --instances 2   # GPU host

Each runtime is `NAME` or `NAME:PRECISION` (torch, onnxruntime, openvino; fp32 or bf16). For the same encoded ELPV
images the script prints:
  1. network only (teacher + bottleneck + student) at --network-batch: ms/image and max relative error vs torch;
  2. in-process `decode_image` + `Detector.predict` (resize, network, fused map, calibration): images/s at each
     batch size;
  3. Triton (every runtime exported as its own product into one repository, one tritonserver, gRPC, one image per
     request): images/s and p50/p99 latency at each concurrency;
and summary tables with each figure's ratio to the first runtime (torch by default). Every measurement also
records the CPU time it cost (this process in-process; the tritonserver process and its model processes through
Triton) per image: on a shared machine that is steadier than images/s, and 1000 * cores / (CPU ms per image)
bounds what the same work can reach on idle cores. Measurements of different runtimes alternate (batch by batch,
concurrency by concurrency), so a change of load hits them alike; still, compare ratios from one run, not figures
across runs. On a busy machine run it as `OMP_WAIT_POLICY=PASSIVE python benchmarks/serving.py ...`: torch's
OpenMP threads otherwise spin while waiting for cores that others hold, which slows torch far more than the other
runtimes (several times, seen on 2 shared cores) and inflates its CPU time.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mrkd.core.config import ModelConfig  # noqa: E402
from mrkd.core.preprocess import decode_image, prepare_batch  # noqa: E402
from mrkd.data import open_dataset  # noqa: E402
from mrkd.model.network import MRKDModel  # noqa: E402
from mrkd.runtime.calibration import Calibration  # noqa: E402
from mrkd.runtime.checkpoint import save_checkpoint  # noqa: E402
from mrkd.runtime.convert import max_relative_error, verification_batch  # noqa: E402
from mrkd.runtime.detector import Detector  # noqa: E402
from mrkd.runtime.runners import PRECISIONS, RUNTIMES  # noqa: E402
from mrkd.triton.launcher import TritonServer  # noqa: E402
from mrkd.triton.repository import ExportOptions, export  # noqa: E402

MIN_BATCHES = 5  # a measurement of one or two batches says nothing


@dataclass
class Measurement:
    label: str
    images: int
    seconds: float
    latencies_ms: list[float]
    cpu_seconds: float = float("nan")  # CPU time of the process(es) doing the work

    @property
    def throughput(self) -> float:
        return self.images / self.seconds

    @property
    def cpu_ms_per_image(self) -> float:
        return 1000 * self.cpu_seconds / self.images

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")


@dataclass(frozen=True)
class RuntimeChoice:
    runtime: str
    precision: str  # "auto": the device's default

    @classmethod
    def parse(cls, text: str) -> "RuntimeChoice":
        runtime, _, precision = text.partition(":")
        if runtime not in RUNTIMES or precision not in ("", *PRECISIONS):
            raise argparse.ArgumentTypeError(f"runtime {text!r}: expected NAME[:PRECISION], NAME one of "
                                             f"{', '.join(RUNTIMES)}, PRECISION one of {', '.join(PRECISIONS)}")
        return cls(runtime, precision or "auto")

    @property
    def label(self) -> str:
        return self.runtime if self.precision == "auto" else f"{self.runtime}:{self.precision}"

    @property
    def product(self) -> str:
        return f"bench_{self.runtime}" + ("" if self.precision == "auto" else f"_{self.precision}")


def random_checkpoint(backbone: str, image_size: int, images: list[np.ndarray], path: Path) -> Path:
    """A checkpoint with random weights (speed does not depend on training), calibrated on real images."""
    torch.manual_seed(0)
    config = ModelConfig(backbone=backbone, image_size=image_size)
    model = MRKDModel.from_config(config).eval()
    detector = Detector(model, config, Calibration(threshold=1.0, low=0.0))
    scores = detector.predict_prepared(prepare_batch(images[:8], image_size)).scores
    save_checkpoint(path, {"model_config": config.to_dict(), "train_config": None, "state_dict": model.state_dict(),
                           "calibration": Calibration.fit(scores).to_dict(), "epoch": 0, "optimizer": None})
    return path


def encoded_cells(count: int) -> list[bytes]:
    """The first `count` real ELPV cells as PNG bytes (what a camera client sends)."""
    records = open_dataset("elpv:mono").test[:count]
    out = []
    for record in records:
        buffer = io.BytesIO()
        Image.fromarray(record.load_image()).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def timed(fn, seconds: float) -> tuple[int, float, list[float], float]:
    """Calls fn() for at least `seconds` (and MIN_BATCHES times) after one warm-up call; returns the calls, wall
    seconds, latencies and this process's CPU seconds."""
    fn()
    calls, latencies, start, cpu = 0, [], time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds or calls < MIN_BATCHES:
        t0 = time.perf_counter()
        fn()
        latencies.append((time.perf_counter() - t0) * 1000)
        calls += 1
    return calls, time.perf_counter() - start, latencies, time.process_time() - cpu


def server_cpu_seconds() -> float:
    """CPU time so far of this process's children: tritonserver and its model (stub) processes."""
    total = 0.0
    for child in psutil.Process().children(recursive=True):
        try:
            times = child.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def bench_network(detector: Detector, x: torch.Tensor, seconds: float) -> Measurement:
    """Images/s and CPU ms/image of the detector's network alone on one batch, for `seconds`."""
    calls, elapsed, latencies, cpu = timed(lambda: detector.network(x), seconds)
    return Measurement("network", calls * len(x), elapsed, latencies, cpu)


def bench_in_process(detector: Detector, encoded: list[bytes], batch_size: int, seconds: float) -> Measurement:
    """decode_image + Detector.predict (resize, network, fused map, calibration) on batches of `batch_size`."""
    batch = [encoded[i % len(encoded)] for i in range(batch_size)]
    calls, elapsed, latencies, cpu = timed(lambda: detector.predict([decode_image(b) for b in batch]), seconds)
    return Measurement(f"in-process batch {batch_size}", calls * batch_size, elapsed, latencies, cpu)


def bench_triton(url: str, model: str, encoded: list[bytes], concurrency: int, seconds: float) -> Measurement:
    """`concurrency` client threads, each sending one image per request back to back."""
    import tritonclient.grpc as grpcclient

    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    errors: list[str] = []
    stop = threading.Event()
    barrier = threading.Barrier(concurrency + 1)

    def worker(index: int) -> None:
        with grpcclient.InferenceServerClient(url) as client:
            inputs = []
            for blob in encoded:
                tensor = grpcclient.InferInput("IMAGE", [1, 1], "BYTES")
                tensor.set_data_from_numpy(np.array([[blob]], dtype=object))
                inputs.append(tensor)
            client.infer(model, [inputs[index % len(inputs)]])  # connection set up before timing
            barrier.wait()
            i = index
            while not stop.is_set():
                t0 = time.perf_counter()
                try:
                    client.infer(model, [inputs[i % len(inputs)]])
                except Exception as exc:  # counted and reported, never silently dropped
                    errors.append(str(exc))
                    return
                latencies[index].append((time.perf_counter() - t0) * 1000)
                i += concurrency

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    barrier.wait()
    start, cpu = time.perf_counter(), server_cpu_seconds()
    time.sleep(seconds)
    stop.set()
    cpu = server_cpu_seconds() - cpu  # the requests in flight at the stop finish after it: a few images' worth
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, e.g. {errors[0]}")
    flat = [x for per_thread in latencies for x in per_thread]
    return Measurement(f"triton concurrency {concurrency}", len(flat), elapsed, flat, cpu)


def int_list(text: str) -> list[int]:
    """argparse type: "1,8,16" -> [1, 8, 16]."""
    return [int(v) for v in text.split(",") if v.strip()]


def runtime_list(text: str) -> list[RuntimeChoice]:
    """argparse type: "torch,openvino:bf16" -> the runtime choices."""
    return [RuntimeChoice.parse(v.strip()) for v in text.split(",") if v.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The benchmark's options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="trained checkpoint (default: random weights of --backbone)")
    p.add_argument("--backbone", default="mobilenet_v2")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--device", choices=["cpu", "gpu"], default="gpu" if torch.cuda.is_available() else "cpu")
    p.add_argument("--runtimes", type=runtime_list, default=runtime_list("torch,onnxruntime,openvino"),
                   help="NAME[:PRECISION] list; ratios are to the first (default torch,onnxruntime,openvino)")
    p.add_argument("--seconds", type=float, default=10.0, help="per measurement")
    p.add_argument("--network-batch", type=int, default=8, help="batch of the network-only measurement (0: skip)")
    p.add_argument("--batch-sizes", type=int_list, default=[1, 8, 16], help="in-process batch sizes")
    p.add_argument("--concurrency", type=int_list, default=[1, 8, 32], help="Triton client threads (empty: skip)")
    p.add_argument("--images", type=int, default=32, help="distinct ELPV cells cycled through")
    p.add_argument("--instances", type=int, default=1, help="detector instances")
    p.add_argument("--preprocess-instances", type=int, default=1)
    p.add_argument("--threads", type=int, default=0,
                   help="per detector instance, every runtime (0 = cores / instances)")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--max-queue-delay-us", type=int, default=2000)
    p.add_argument("--preferred-batch-sizes", type=int_list, default=[])
    return p.parse_args(argv)


def ratio_table(title: str, columns: list[str], rows: dict[str, list[Measurement]]) -> str:
    """Markdown: one row per runtime, each cell `images/s (ratio to the first row) / CPU ms per image`."""
    names = list(rows)
    base = rows[names[0]]
    lines = [f"{title}", "", "| runtime | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name in names:
        cells = [f"{m.throughput:.1f} ({m.throughput / b.throughput:.2f}x) / {m.cpu_ms_per_image:.1f} ms"
                 for m, b in zip(rows[name], base)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Measures in-process and Triton throughput per runtime, side by side; returns the exit status."""
    args = parse_args(argv)
    device = "cuda" if args.device == "gpu" else "cpu"
    encoded = encoded_cells(args.images)
    choices = args.runtimes
    with tempfile.TemporaryDirectory(prefix="mrkd-bench-") as tmp:
        work = Path(tmp)
        checkpoint = Path(args.checkpoint) if args.checkpoint else random_checkpoint(
            args.backbone, args.image_size, [decode_image(b) for b in encoded], work / "checkpoint.pt")
        threads = args.threads or max(1, torch.get_num_threads() // args.instances)
        detectors = {c.label: Detector.load(checkpoint, device=device, runtime=c.runtime, precision=c.precision,
                                            threads=threads) for c in choices}
        first = detectors[choices[0].label]
        print(f"model: {first.config.backbone} {first.image_size}px on {device}, {threads} threads, {args.images} "
              f"ELPV cells as PNG, {args.seconds:.0f} s per measurement; runtimes: "
              f"{', '.join(f'{d.runtime} {d.precision}' for d in detectors.values())}; {os.cpu_count()} cores, load "
              f"average {os.getloadavg()[0]:.1f}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '')}",
              flush=True)

        if args.network_batch:
            x = verification_batch(first.image_size, args.network_batch).to(device)
            reference = detectors[choices[0].label].network(x)
            print(f"network only (teacher + bottleneck + student), batch {args.network_batch}:")
            for label, detector in detectors.items():
                m = bench_network(detector, x, args.seconds)
                error = max_relative_error(detector.network(x), reference)
                print(f"  {label:<20} {1000 * m.seconds / m.images:7.1f} ms/image ({m.cpu_ms_per_image:6.1f} CPU ms)   "
                      f"max relative error vs {choices[0].label} {error:.1e}", flush=True)

        in_process: dict[str, list[Measurement]] = {label: [] for label in detectors}
        for batch_size in args.batch_sizes:
            for label, detector in detectors.items():
                m = bench_in_process(detector, encoded, batch_size, args.seconds)
                in_process[label].append(m)
                print(f"  {label:<20} {m.label:<24} {m.throughput:8.1f} images/s ({m.cpu_ms_per_image:6.1f} CPU ms "
                      f"per image)   batch latency p50 {m.percentile(50):7.1f} ms", flush=True)
        detectors.clear()

        triton: dict[str, list[Measurement]] = {c.label: [] for c in choices}
        if args.concurrency:
            calibration_images = work / "calibration-images"  # bf16 exports are checked (and recalibrated) here
            calibration_images.mkdir()
            for i, blob in enumerate(encoded):
                (calibration_images / f"cell{i:03d}.png").write_bytes(blob)
            models = {}
            for c in choices:
                opts = ExportOptions(
                    name=c.product, device=args.device, max_batch_size=args.max_batch_size, instances=args.instances,
                    preprocess_instances=args.preprocess_instances, torch_threads=args.threads,
                    max_queue_delay_us=args.max_queue_delay_us, preferred_batch_sizes=args.preferred_batch_sizes,
                    runtime=c.runtime, precision=c.precision,
                    calibration_images=str(calibration_images) if c.precision == "bf16" else None,
                    recalibrate=c.precision == "bf16" and args.device == "cpu")
                models[c.label] = export(checkpoint, work / "repo", opts).models["ensemble"]
            with TritonServer(work / "repo", grpc_port=0, http_port=0, metrics_port=0,
                              log_file=work / "server.log") as server:
                for model in models.values():  # warm-up at the highest concurrency
                    bench_triton(server.grpc_url, model, encoded, max(args.concurrency), 2.0)
                for concurrency in args.concurrency:
                    for label, model in models.items():
                        m = bench_triton(server.grpc_url, model, encoded, concurrency, args.seconds)
                        triton[label].append(m)
                        print(f"  {label:<20} {m.label:<24} {m.throughput:8.1f} images/s "
                              f"({m.cpu_ms_per_image:6.1f} CPU "
                              f"ms per image)   latency p50 {m.percentile(50):7.1f} ms  p99 {m.percentile(99):7.1f} ms",
                              flush=True)

    print()
    print(ratio_table("in-process: images/s (ratio to the first runtime) / CPU ms per image",
                      [f"batch {b}" for b in args.batch_sizes], in_process))
    if args.concurrency:
        print()
        print(ratio_table("Triton over gRPC: images/s (ratio to the first runtime) / server CPU ms per image",
                          [f"concurrency {c}" for c in args.concurrency], triton))
        print()
        for label in triton:
            best_in = max(in_process[label], key=lambda m: m.throughput)
            best_triton = max(triton[label], key=lambda m: m.throughput)
            print(f"{label}: best Triton {best_triton.throughput:.1f} images/s ({best_triton.label}) = "
                  f"{best_triton.throughput / best_in.throughput:.2f} x best in-process ({best_in.label})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

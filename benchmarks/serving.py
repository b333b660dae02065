"""Triton serving vs in-process inference of the same MRKD model, side by side.

  python benchmarks/serving.py                                   # random-weights mobilenet_v2, 256 px, CPU
  python benchmarks/serving.py --checkpoint runs/elpv-mono/checkpoint.pt --seconds 20
  python benchmarks/serving.py --backbone wide_resnet50_2 --device gpu --instances 2     # on a GPU host

Prints, for the same encoded ELPV images: in-process `decode_image` + `Detector.predict` throughput at each batch
size; Triton (mrkd.export -> mrkd.serve -> gRPC, one image per request) throughput and p50/p99 latency at each
concurrency; and the ratio of the best Triton throughput to the best in-process throughput.
"""
from __future__ import annotations

import argparse
import io
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mrkd.runtime.calibration import Calibration  # noqa: E402
from mrkd.runtime.checkpoint import save_checkpoint  # noqa: E402
from mrkd.core.config import ModelConfig  # noqa: E402
from mrkd.data import open_dataset  # noqa: E402
from mrkd.runtime.detector import Detector  # noqa: E402
from mrkd.triton.repository import ExportOptions, export  # noqa: E402
from mrkd.core.preprocess import decode_image, prepare_batch  # noqa: E402
from mrkd.triton.launcher import TritonServer  # noqa: E402
from mrkd.model.network import MRKDModel  # noqa: E402


MIN_BATCHES = 5  # a measurement of one or two batches says nothing


@dataclass
class Measurement:
    label: str
    images: int
    seconds: float
    latencies_ms: list[float]

    @property
    def throughput(self) -> float:
        return self.images / self.seconds

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")


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
    records = open_dataset("elpv:mono").test[:count]
    out = []
    for record in records:
        buffer = io.BytesIO()
        Image.fromarray(record.load_image()).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def bench_in_process(detector: Detector, encoded: list[bytes], batch_size: int, seconds: float) -> Measurement:
    """decode_image + Detector.predict (resize, network, fused map, calibration) on batches of `batch_size`."""
    batch = [encoded[i % len(encoded)] for i in range(batch_size)]
    detector.predict([decode_image(b) for b in batch])  # warm-up for this shape
    done, latencies, start = 0, [], time.perf_counter()
    while time.perf_counter() - start < seconds or len(latencies) < MIN_BATCHES:
        t0 = time.perf_counter()
        detector.predict([decode_image(b) for b in batch])
        latencies.append((time.perf_counter() - t0) * 1000)
        done += batch_size
    return Measurement(f"in-process batch {batch_size}", done, time.perf_counter() - start, latencies)


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
    start = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, e.g. {errors[0]}")
    flat = [x for per_thread in latencies for x in per_thread]
    return Measurement(f"triton concurrency {concurrency}", len(flat), elapsed, flat)


def int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="trained checkpoint (default: random weights of --backbone)")
    p.add_argument("--backbone", default="mobilenet_v2")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--device", choices=["cpu", "gpu"], default="gpu" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seconds", type=float, default=10.0, help="per measurement")
    p.add_argument("--batch-sizes", type=int_list, default=[1, 4, 8, 16], help="in-process batch sizes")
    p.add_argument("--concurrency", type=int_list, default=[1, 8, 32])
    p.add_argument("--images", type=int, default=32, help="distinct ELPV cells cycled through")
    p.add_argument("--instances", type=int, default=1, help="detector instances")
    p.add_argument("--preprocess-instances", type=int, default=1)
    p.add_argument("--torch-threads", type=int, default=0, help="per detector instance (0 = cores / instances)")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--max-queue-delay-us", type=int, default=2000)
    p.add_argument("--preferred-batch-sizes", type=int_list, default=[])
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = "cuda" if args.device == "gpu" else "cpu"
    encoded = encoded_cells(args.images)
    with tempfile.TemporaryDirectory(prefix="mrkd-bench-") as tmp:
        work = Path(tmp)
        checkpoint = Path(args.checkpoint) if args.checkpoint else random_checkpoint(
            args.backbone, args.image_size, [decode_image(b) for b in encoded], work / "checkpoint.pt")
        detector = Detector.load(checkpoint, device=device)
        print(f"model: {detector.config.backbone} {detector.image_size}px on {device}, torch threads "
              f"{torch.get_num_threads()}, {args.images} ELPV cells as PNG, {args.seconds:.0f} s per measurement")
        in_process = [bench_in_process(detector, encoded, b, args.seconds) for b in args.batch_sizes]
        for m in in_process:
            print(f"  {m.label:<24} {m.throughput:8.1f} images/s   batch latency p50 {m.percentile(50):7.1f} ms")
        del detector

        opts = ExportOptions(name="bench", device=args.device, max_batch_size=args.max_batch_size,
                             instances=args.instances, preprocess_instances=args.preprocess_instances,
                             torch_threads=args.torch_threads, max_queue_delay_us=args.max_queue_delay_us,
                             preferred_batch_sizes=args.preferred_batch_sizes)
        result = export(checkpoint, work / "repo", opts)
        triton = []
        with TritonServer(work / "repo", grpc_port=0, http_port=0, metrics_port=0,
                          log_file=work / "server.log") as server:
            bench_triton(server.grpc_url, result.models["ensemble"], encoded, max(args.concurrency), 2.0)  # warm-up
            for c in args.concurrency:
                m = bench_triton(server.grpc_url, result.models["ensemble"], encoded, c, args.seconds)
                triton.append(m)
                print(f"  {m.label:<24} {m.throughput:8.1f} images/s   latency p50 {m.percentile(50):7.1f} ms  "
                      f"p99 {m.percentile(99):7.1f} ms")
    best_in = max(in_process, key=lambda m: m.throughput)
    best_triton = max(triton, key=lambda m: m.throughput)
    ratio = best_triton.throughput / best_in.throughput
    print(f"best in-process: {best_in.throughput:.1f} images/s ({best_in.label}); best Triton: "
          f"{best_triton.throughput:.1f} images/s ({best_triton.label}); Triton / in-process = {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

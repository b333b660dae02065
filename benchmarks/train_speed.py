"""Training speed on this machine: the old step against the new one, side by side in one run, same data and seed.

  python benchmarks/train_speed.py                                  # elpv:mono, 256 px, batch 16 (the default)
  python benchmarks/train_speed.py --steps 30 --curve-steps 150 --out runs/train_speed.json

Paths (the method is the same in all of them; only how a step is computed changes):
  old            teacher on the clean AND the corrupted images every step, fp32, contiguous tensors
  channels_last  + channels_last memory format
  cached         + clean-image teacher features computed once before training (they never change)
  new            + bf16 autocast for the teacher on corrupted images and the student (where the CPU has native
                 bf16: AVX512-BF16 or AMX; `--precision fp32` elsewhere). This is what `mrkd.train` does.

`--clock cpu --threads 1` times the process's CPU time instead of elapsed time: the ratios then hold on a machine
that is busy with other work. Prints images/s per path (after `--warmup` steps; the one-time feature cache is
reported apart), the time split of a step (data and ILM, teacher, student forward, backward + Adam), and the
loss curves of old and new over
`--curve-steps` steps (mean of each window of 25 steps) to show that the speed-up does not change training.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mrkd.core.config import TrainConfig  # noqa: E402
from mrkd.core.files import write_json  # noqa: E402
from mrkd.runtime.training import PhaseTimer, StepOptions, Trainer, cpu_has_native_bf16  # noqa: E402

PATHS = {
    "old": StepOptions(cache_targets=False, bf16=False, channels_last=False),
    "channels_last": StepOptions(cache_targets=False, bf16=False, channels_last=True),
    "cached": StepOptions(cache_targets=True, bf16=False, channels_last=True),
    "new": StepOptions(cache_targets=True, bf16=True, channels_last=True),
}


def measure(cfg: TrainConfig, options: StepOptions, steps: int, warmup: int, clock) -> dict:
    """Images/s and the time per phase of a step on one path, after `warmup` steps."""
    start = clock()
    timer = PhaseTimer(clock=clock)
    trainer = Trainer(cfg, show_progress=False, options=options, timer=timer)
    setup = clock() - start
    trainer.train_steps(until=warmup)
    timer.enabled = True
    start = clock()
    trainer.train_steps(until=warmup + steps)
    seconds = clock() - start
    return {"images_per_s": steps * cfg.batch_size / seconds, "ms_per_step": 1000 * seconds / steps,
            "setup_s": setup, "phases_ms": {k: 1000 * v / steps for k, v in timer.seconds.items()},
            "cache_built": trainer.features.cached is not None}


def loss_curve(cfg: TrainConfig, options: StepOptions, steps: int) -> list[float]:
    """The losses of `steps` steps on one path (to compare old and new training)."""
    trainer = Trainer(cfg, show_progress=False, options=options)
    trainer.train_steps(until=steps)
    return trainer.state.losses


def main(argv: list[str] | None = None) -> int:
    """Runs the old and new training paths side by side and prints the ratios; returns the exit status."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="elpv:mono")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=20, help="timed steps per path")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--curve-steps", type=int, default=100, help="steps of the old-vs-new loss curves (0: skip)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall: elapsed time (an idle machine); cpu: this process's CPU time, which other load on "
                        "the machine barely changes (use with --threads 1)")
    p.add_argument("--out", default=None, help="write the figures as JSON")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = TrainConfig(data=a.data, image_size=a.image_size, batch_size=a.batch_size, out="/dev/null",
                      steps=max(a.steps + a.warmup, a.curve_steps), save_every=0, device="cpu")
    clock = time.perf_counter if a.clock == "wall" else time.process_time
    print(f"{a.data}, {a.image_size} px, batch {a.batch_size}, {torch.get_num_threads()} threads, "
          f"native bf16: {cpu_has_native_bf16()}, {a.clock} clock")
    results = {}
    for name, options in PATHS.items():
        results[name] = r = measure(cfg, options, a.steps, a.warmup, clock)
        print(f"{name:14s} {r['images_per_s']:6.1f} images/s  {r['ms_per_step']:7.0f} ms/step  "
              f"(x{r['images_per_s'] / results['old']['images_per_s']:.2f} vs old; setup {r['setup_s']:.1f} s)")
        print("               " + ", ".join(f"{k} {v:.0f} ms" for k, v in r["phases_ms"].items()))
    speedup = results["new"]["images_per_s"] / results["old"]["images_per_s"]
    print(f"new vs old: {speedup:.2f}x training images/s")
    report = {"config": vars(a), "threads": torch.get_num_threads(), "native_bf16": cpu_has_native_bf16(),
              "paths": results, "speedup_new_vs_old": speedup}
    if a.curve_steps:
        curves = {name: loss_curve(cfg, PATHS[name], a.curve_steps) for name in ("old", "new")}
        window = 25
        print(f"loss, mean of each {window} steps: step  old  new  (new - old)")
        for start in range(0, a.curve_steps, window):
            old, new = (float(np.mean(curves[n][start : start + window])) for n in ("old", "new"))
            print(f"  {start + 1:4d}-{min(start + window, a.curve_steps):4d}  {old:.4f}  {new:.4f}  {new - old:+.4f}")
        noise = float(np.std(np.diff(curves["old"][-window:])) / np.sqrt(2))
        print(f"  step-to-step noise of the old curve over its last {window} steps: {noise:.4f}")
        report["curves"] = curves
    if a.out:
        write_json(Path(a.out), report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

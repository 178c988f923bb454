"""The GPU rows of `python -m rekd.bench` (group `gpu`, run only where CUDA is present).

1. Training throughput and peak memory of spiking ResNet18, T=4, CIFAR-100-shaped input, batch 128:
   bf16 autocast with and without torch.compile and channels_last, fp32 for reference, and bf16 with each
   of spikingjelly's IF implementations (SJ_IF_CUDA_IMPLEMENTATION = cuda, triton, torch).
2. Trials per hour of a search whose trials share one GPU, 1, 2 and 4 at a time.

Every throughput variant runs in a process of its own (`python -m rekd.bench_gpu VARIANT`): spikingjelly
chooses its IF implementation when its ops first run, and compile caches and peak-memory counters are
per process. The same function measures on a CPU, which is how the tests exercise it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from rekd.config import TrainConfig
from rekd.models import build_model
from rekd.optim import Optimization
from rekd.train import OBJECTIVES, train_step

# name -> (environment, settings): amp (bf16 autocast), compile, channels_last
VARIANTS: dict[str, tuple[dict, dict]] = {
    "fp32": ({}, dict(amp=False, compile=False, channels_last=False)),
    "bf16": ({}, dict(amp=True, compile=False, channels_last=False)),
    "bf16 + channels_last": ({}, dict(amp=True, compile=False, channels_last=True)),
    "bf16 + compile": ({}, dict(amp=True, compile=True, channels_last=False)),
    "bf16 + compile + channels_last": ({}, dict(amp=True, compile=True, channels_last=True)),
    **{f"bf16, IF {impl}": ({"SJ_IF_CUDA_IMPLEMENTATION": impl}, dict(amp=True, compile=False, channels_last=True))
       for impl in ("cuda", "triton", "torch")},
}


def measure(device: str, batch: int, steps: int, amp: bool, compile: bool, channels_last: bool) -> dict:
    """Images per second over `steps` training steps of spiking ResNet18 (after 3 warm-up steps), and the
    peak GPU memory of those steps."""
    dev = torch.device(device)
    cfg = TrainConfig(arch="resnet18", amp=amp, channels_last=channels_last).resolved(4)
    torch.manual_seed(0)
    model = build_model(cfg, 3, 100, 32).to(dev, memory_format=torch.channels_last if channels_last
                                            else torch.preserve_format)
    forward = model.compiled() if compile else model  # as train() compiles: the body, reset_net eager
    optimization = Optimization(cfg, model, steps + 3, dev)
    x = torch.rand(cfg.timesteps, batch, 3, 32, 32, device=dev)  # (T, N, C, H, W), direct encoding
    y = torch.randint(0, 100, (batch,), device=dev)

    def step() -> None:  # the training step train() runs, through the compiled module when there is one
        train_step(forward, None, OBJECTIVES["baseline"], optimization, x, y, cfg)

    for _ in range(3):  # compilation and autotuning happen here
        step()
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return {"images_per_s": batch * steps / elapsed,
            "peak_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else float("nan")}


def variant_in_subprocess(name: str, device: str, batch: int, steps: int) -> dict:
    env, _ = VARIANTS[name]
    out = subprocess.run([sys.executable, "-m", "rekd.bench_gpu", name, "--device", device, "--batch", str(batch),
                          "--steps", str(steps)], env={**os.environ, **env}, capture_output=True, text=True)
    if out.returncode != 0:
        lines = out.stderr.strip().splitlines()
        return {"error": lines[-1] if lines else f"exit status {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def throughput_rows(quick: bool) -> list:
    from rekd.bench import Row

    steps = 10 if quick else 50
    results = {name: variant_in_subprocess(name, "cuda", 128, steps) for name in VARIANTS}
    reference = results["bf16"].get("images_per_s")
    rows = []
    for name, r in results.items():
        if "error" in r:
            rows.append(Row(f"resnet18 T=4 batch 128 training [{name}]", float("nan"), "images/s", None,
                            f"did not run: {r['error'][:160]}"))
            continue
        relative = f"{r['images_per_s'] / reference:.2f}x bf16" if reference else ""
        rows.append(Row(f"resnet18 T=4 batch 128 training [{name}]", r["images_per_s"], "images/s", None,
                        f"peak {r['peak_mib']:.0f} MiB; {relative}", higher_is_better=True))
    return rows


def sharing_rows(quick: bool) -> list:
    """Trials per hour of resnet18 searches on synthetic CIFAR-100 files, k trials sharing the GPU."""
    from rekd.bench import Row
    from rekd.datasets import load_dataset
    from rekd.datasets.synthetic import make_cifar100_folder
    from rekd.driver import run_search
    from rekd.ray_session import start_ray
    from rekd.search import build_parser, plan_from_args
    from rekd.tracking_store import open_store

    start_ray()
    rows = []
    with tempfile.TemporaryDirectory(prefix="rekd-bench-gpu-") as tmp:
        root = make_cifar100_folder(Path(tmp) / "data", n_train=2000 if quick else 10000, n_test=500)
        for k in (1, 2, 4):
            storage = Path(tmp) / f"share{k}"
            args = build_parser().parse_args([
                "baseline", "--dataset", "cifar100", "--arch", "resnet18", "--data-root", str(root),
                "--num-samples", str(2 * k), "--epochs", "2", "--max-concurrency", str(k),
                "--storage-path", str(storage), "--name", f"share{k}"])
            plan = plan_from_args(args, [])
            study = plan.study.with_overrides(gpus=1.0 / k, grace_period=2)  # ASHA stops nothing
            plan = dataclasses.replace(plan, study=study)
            data = load_dataset(plan.base)
            client, experiment_id = open_store(plan.tracking_uri, plan.experiment)
            started = time.perf_counter()
            with open(os.devnull, "w") as quiet:
                stdout, sys.stdout = sys.stdout, quiet
                try:
                    run_search(plan, data, client, experiment_id)
                finally:
                    sys.stdout = stdout
            hours = (time.perf_counter() - started) / 3600
            rows.append(Row(f"resnet18 search, {k} trial(s) sharing the GPU", 2 * k / hours, "trials/h", None,
                            f"{2 * k} trials of 2 epochs over {len(data.train)} images in {hours * 3600:.0f} s",
                            higher_is_better=True))
    return rows


def gpu_rows(quick: bool) -> list:
    return throughput_rows(quick) + sharing_rows(quick)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rekd.bench_gpu", description="One throughput variant, as JSON.")
    p.add_argument("variant", choices=list(VARIANTS))
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=50)
    args = p.parse_args(argv)
    print(json.dumps(measure(args.device, args.batch, args.steps, **VARIANTS[args.variant][1])))
    return 0


if __name__ == "__main__":
    sys.exit(main())

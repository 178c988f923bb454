"""The GPU rows of `python -m rekd.bench` (group `gpu`, run only where CUDA is present).

1. Training throughput and peak memory of spiking ResNet18, T=4, CIFAR-100-shaped input, batch 128:
   bf16 autocast with and without torch.compile and channels_last, fp32 for reference, and bf16 with each
   of spikingjelly's IF implementations (SJ_IF_CUDA_IMPLEMENTATION = cuda, triton, torch).
2. Whole-epoch samples/s of the three modes through train() (resnet18, synthetic CIFAR-100 files, batch 128),
   against the training steps alone, and of 1, 2 and 4 baseline trainings sharing the GPU (processes
   started together, standing in for Ray trials: Ray's wheel cannot be carried to a lent GPU machine).
3. Without --quick, trials per hour of a Ray search whose trials share one GPU, 1, 2 and 4 at a time.

Every throughput variant runs in a process of its own (`python -m rekd.bench_gpu VARIANT`): spikingjelly
chooses its IF implementation when its ops first run, and compile caches and peak-memory counters are
per process. The same function measures on a CPU, which is how the tests exercise it.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
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
from rekd.datasets import load_dataset
from rekd.snn.models import build_model
from rekd.train.optim import Optimization
from rekd.snn.teachers import cpu_weights, load_cached_teacher, store_teacher
from rekd.train.loop import OBJECTIVES, ensure_teacher, train, train_step

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
    from rekd.bench.rows import Row

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
    from rekd.bench.rows import Row
    from rekd.datasets import load_dataset
    from rekd.datasets.synthetic import make_cifar100_folder
    from rekd.search.driver import run_search
    from rekd.search.ray_session import start_ray
    from rekd.search.plan import make_plan

    start_ray()
    rows = []
    with tempfile.TemporaryDirectory(prefix="rekd-bench-gpu-") as tmp:
        root = make_cifar100_folder(Path(tmp) / "data", n_train=2000 if quick else 10000, n_test=500)
        for k in (1, 2, 4):
            storage = Path(tmp) / f"share{k}"
            plan = make_plan("baseline", dataset="cifar100", arch="resnet18", data_root=root, num_samples=2 * k,
                             epochs=2, max_concurrency=k, storage_path=storage, name=f"share{k}")
            plan = plan.with_study(gpus=1.0 / k, grace_period=2)  # ASHA stops nothing
            data = load_dataset(plan.base)
            started = time.perf_counter()
            with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
                run_search(plan, data)
            hours = (time.perf_counter() - started) / 3600
            rows.append(Row(f"resnet18 search, {k} trial(s) sharing the GPU", 2 * k / hours, "trials/h", None,
                            f"{2 * k} trials of 2 epochs over {len(data.train)} images in {hours * 3600:.0f} s",
                            higher_is_better=True))
    return rows


def measure_epochs(mode: str, device: str, data_root: str, cache_dir: str, arch: str, batch: int,
                   epochs: int = 2) -> dict:
    """Samples per second of whole epochs of `train()` (training, validation with its spike statistics and
    the checkpoint-free report: what a trial's epoch costs) against the training steps alone, from the last
    epoch (the first one compiles). sparse_kd's teacher is the cached baseline of the same settings."""
    cfg = TrainConfig(mode=mode, dataset="cifar100", arch=arch, data_root=data_root, cache_dir=cache_dir,
                      epochs=epochs, batch_size=batch, device=device, prune_ratio=0.5)
    weights = ensure_teacher(cfg) if mode == "sparse_kd" else None
    marks = [time.perf_counter()]
    result = train(cfg, teacher_weights=weights, on_epoch=lambda m: marks.append(time.perf_counter()))
    if mode == "baseline" and load_cached_teacher(result.config) is None:  # sparse_kd's teacher, as rekd.train.loop does
        store_teacher(result.config, cpu_weights(result.model), result.final["val_acc"])
    last = result.final
    return {"samples_per_s": last["samples_per_s"],
            "whole_epoch_samples_per_s": len(load_dataset(result.config).train) / (marks[-1] - marks[-2]),
            "compile_time_s": result.history[0].get("compile_time_s", 0.0), "compile": result.config.compile,
            "amp": result.config.amp}


def epochs_in_subprocesses(mode: str, k: int, device: str, root: Path, cache: Path, arch: str, batch: int) -> list[dict]:
    """measure_epochs in k processes started together: k trials sharing one GPU (rekd.train.loop processes stand in
    for Ray trials, whose wheel is too large to carry to a lent GPU machine)."""
    command = [sys.executable, "-m", "rekd.bench_gpu", "epochs", mode, "--device", device, "--data-root", str(root),
               "--cache-dir", str(cache), "--arch", arch, "--batch", str(batch)]
    running = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(k)]
    results = []
    for process in running:
        out, err = process.communicate()
        if process.returncode != 0:
            lines = err.strip().splitlines()
            results.append({"error": lines[-1] if lines else f"exit status {process.returncode}"})
        else:
            results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def epoch_rows(quick: bool, device: str = "cuda", arch: str = "resnet18", batch: int = 128,
               n_train: Optional[int] = None) -> list:
    """Whole-epoch samples/s of the three modes through train(), and of 1, 2 and 4 baseline trials sharing
    the GPU, on synthetic CIFAR-100 files (the real release is not on the GPU machine)."""
    from rekd.bench.rows import Row
    from rekd.datasets.synthetic import make_cifar100_folder

    rows = []
    with tempfile.TemporaryDirectory(prefix="rekd-bench-gpu-") as tmp:
        n = n_train or (5000 if quick else 20000)
        root = make_cifar100_folder(Path(tmp) / "data", n_train=n, n_test=500)
        cache = Path(tmp) / "cache"
        baseline = None
        for mode in ("baseline", "sparse_kd", "default_kd"):
            [r] = epochs_in_subprocesses(mode, 1, device, root, cache, arch, batch)
            name = f"{arch} {mode} whole epoch, cifar100-shaped, batch {batch} [{device}]"
            if "error" in r:
                rows.append(Row(name, float("nan"), "samples/s", None, f"did not run: {r['error'][:160]}"))
                continue
            baseline = r["whole_epoch_samples_per_s"] if mode == "baseline" else baseline
            relative = f"{r['whole_epoch_samples_per_s'] / baseline:.2f}x baseline; " if baseline else ""
            rows.append(Row(name, r["whole_epoch_samples_per_s"], "samples/s", None,
                            f"{relative}steps alone {r['samples_per_s']:,.0f}/s (whole epoch "
                            f"{r['whole_epoch_samples_per_s'] / r['samples_per_s']:.2f} of it); compile "
                            f"{r['compile']} ({r['compile_time_s']:.0f} s), amp {r['amp']}", higher_is_better=True))
        for k in (1, 2, 4):
            results = epochs_in_subprocesses("baseline", k, device, root, cache, arch, batch)
            errors = [r["error"] for r in results if "error" in r]
            name = f"{arch} baseline, {k} trial(s) sharing the GPU, whole epochs [{device}]"
            if errors:
                rows.append(Row(name, float("nan"), "samples/s", None, f"did not run: {errors[0][:160]}"))
                continue
            each = [r["whole_epoch_samples_per_s"] for r in results]
            rows.append(Row(name, sum(each), "samples/s", None,
                            f"in all; each {min(each):,.0f}-{max(each):,.0f}/s", higher_is_better=True))
    return rows


def gpu_rows(quick: bool) -> list:
    return throughput_rows(quick) + epoch_rows(quick) + ([] if quick else sharing_rows_if_ray())


def sharing_rows_if_ray() -> list:
    """The Ray search rows where Ray is installed; else one row that says why not (the process rows stand in)."""
    from rekd.bench.rows import Row

    missing = [m for m in ("ray", "optuna", "mlflow") if importlib.util.find_spec(m) is None]
    if missing:
        return [Row("resnet18 search, trials sharing the GPU", float("nan"), "trials/h", None,
                    f"did not run: {', '.join(missing)} not installed here; the rows of processes sharing the "
                    "GPU stand in")]
    return sharing_rows(quick=False)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rekd.bench_gpu",
                                description="One measurement in a process of its own, as JSON: a throughput "
                                            "variant, or `epochs MODE` (whole epochs through train()).")
    p.add_argument("variant", choices=[*VARIANTS, "epochs"])
    p.add_argument("mode", nargs="?", choices=("baseline", "sparse_kd", "default_kd"), default="baseline")
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--data-root", help="epochs: a CIFAR-100 folder")
    p.add_argument("--cache-dir", help="epochs: the teacher cache")
    args = p.parse_args(argv)
    if args.variant == "epochs":
        print(json.dumps(measure_epochs(args.mode, args.device, args.data_root, args.cache_dir, args.arch, args.batch)))
    else:
        print(json.dumps(measure(args.device, args.batch, args.steps, **VARIANTS[args.variant][1])))
    return 0

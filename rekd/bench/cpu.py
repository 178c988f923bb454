"""The CPU rows of `python -m rekd.bench`: the cost of every layer of rekd, measured side by side as ratios.

Absolute times on shared machines are noise; ratios of two things measured in the same run are not.
Each row has a target; the table says whether it holds. `--quick` runs a reduced set in a few minutes,
`--json FILE` writes the rows. Search efficiency (row group 5) is measured on a synthetic multi-fidelity
benchmark in rekd.bench.search_efficiency.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from rekd.bench.rows import Row, interleaved_median_times, median_time
from rekd.config import TrainConfig
from rekd.snn.models import ARCHS, SpikingNet, build_model

def step_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


LAYOUT = torch.channels_last  # as train() runs with the default TrainConfig.channels_last
SHAPES = {"tiny": (1, 8, 10, 4, 32), "resnet18": (3, 32, 100, 4, 32)}  # channels, size, classes, T, batch


def snn_vs_ann(arch: str, quick: bool) -> Row:
    """One SNN training step at T timesteps / (T x the same network as an ANN: ReLU for IF, T=1)."""
    channels, size, classes, timesteps, batch = SHAPES[arch]
    if quick and arch == "resnet18":
        batch = 8
    torch.manual_seed(0)
    cfg = TrainConfig(arch=arch).resolved(timesteps)
    snn = build_model(cfg, channels, classes, size).to(memory_format=LAYOUT)
    ann = SpikingNet(ARCHS[arch](channels, classes, size, lambda: nn.ReLU())).to(memory_format=LAYOUT)
    x = torch.rand(timesteps, batch, channels, size, size)
    y = torch.randint(0, classes, (batch,))
    repeats = 3 if quick else 10
    times = interleaved_median_times({"snn": step_fn(snn, x, y), "ann": step_fn(ann, x[:1], y)}, 1, repeats)
    t_snn, t_ann = times["snn"], times["ann"]
    return Row(f"snn_step / (T x ann_step) [{arch}, T={timesteps}, batch {batch}, cpu]", t_snn / (timesteps * t_ann),
               "ratio", 1.25, f"snn {t_snn * 1e3:.1f} ms, ann {t_ann * 1e3:.1f} ms")


def compile_row(arch: str, quick: bool) -> Row:
    """What torch.compile does to a CPU training step (rekd.train.loop's step, baseline mode): compiled / eager
    step time, and the cold compile time (an empty kernel cache) it has to win back. `compile: auto` follows
    this row on CPUs: on where a run earns the compile time back, off for rekd.train.optim.CPU_EAGER_ARCHS."""
    from rekd.train.optim import Optimization
    from rekd.train.loop import OBJECTIVES, train_step

    channels, size, classes, timesteps, batch = SHAPES[arch]
    if quick and arch == "resnet18":
        batch = 8
    cfg = TrainConfig(arch=arch).resolved(timesteps)
    x = torch.rand(timesteps, batch, channels, size, size)
    y = torch.randint(0, classes, (batch,))
    steps = {}
    for name in ("eager", "compiled"):
        torch.manual_seed(0)
        model = build_model(cfg, channels, classes, size).to(memory_format=LAYOUT)
        optimization = Optimization(cfg, model, 1000, torch.device("cpu"))
        forward = model.compiled() if name == "compiled" else model
        steps[name] = functools.partial(train_step, forward, None, OBJECTIVES["baseline"], optimization, x, y, cfg)
    previous = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    with tempfile.TemporaryDirectory(prefix="rekd-bench-compile-") as cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache  # cold: what a first run on a machine pays
        torch.compiler.reset()
        start = time.perf_counter()
        steps["compiled"]()
        cold = time.perf_counter() - start
        times = interleaved_median_times(steps, 2, 3 if quick else 10)
    if previous is None:
        os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
    else:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = previous
    saved = times["eager"] - times["compiled"]
    paid_back = f"paid back after {cold / saved:,.0f} steps" if saved > 0 else "never paid back"
    return Row(f"compiled_step / eager_step [{arch}, T={timesteps}, batch {batch}, cpu]",
               times["compiled"] / times["eager"], "ratio", None,
               f"compiled {times['compiled'] * 1e3:.1f} ms, eager {times['eager'] * 1e3:.1f} ms; cold compile "
               f"{cold:.1f} s, {paid_back}")


def distillation_overhead(quick: bool) -> list[Row]:
    """sparse_kd and default_kd training steps against a baseline step, through rekd.train.loop.train_step."""
    from rekd.datasets import load_dataset
    from rekd.train.optim import Optimization
    from rekd.snn.teachers import PrunedTeacher
    from rekd.train.loop import OBJECTIVES, resolve, teacher_outputs, train_step

    base = resolve(TrainConfig(batch_size=32))
    data = load_dataset(base)
    x, y = data.train.x[:32], data.train.y[:32]
    inputs = data.to_input(x, base.timesteps)
    times, steps = {}, {}
    for mode in ("baseline", "sparse_kd", "sparse_kd per step", "sparse_kd per step compiled", "default_kd"):
        cfg = dataclasses.replace(base, mode=mode.split()[0], prune_ratio=0.5)
        torch.manual_seed(0)
        model = build_model(cfg, data.in_channels, data.num_classes, data.resolution)
        teacher = (PrunedTeacher(cfg, model.state_dict(), data.in_channels, data.num_classes, data.resolution)
                   .to(memory_format=LAYOUT) if cfg.mode == "sparse_kd" else None)
        model.to(memory_format=LAYOUT)
        optimization = Optimization(cfg, model, 1000, torch.device("cpu"))
        given = None
        if mode == "sparse_kd":  # what train() does for data without augmentation: logits computed once
            start = time.perf_counter()
            cached = teacher_outputs(teacher, data, data.train, cfg, optimization)
            times["precompute"] = time.perf_counter() - start
            given = cached[torch.arange(32)]
        teacher_forward = teacher.compiled() if mode.endswith("compiled") else teacher
        steps[mode] = functools.partial(train_step, model, teacher_forward, OBJECTIVES[cfg.mode], optimization,
                                        inputs, y, cfg, teacher_logits=given)
    times.update(interleaved_median_times(steps, 3, 25 if quick else 60))
    steps_per_epoch = len(data.train) // 32
    amortised = times["sparse_kd"] + times["precompute"] / (base.epochs * steps_per_epoch)
    return [
        Row("sparse_kd_step / baseline_step [tiny, digits: teacher logits precomputed]", amortised / times["baseline"],
            "ratio", 1.40, f"one teacher pass over the training split ({times['precompute'] * 1e3:.0f} ms) amortised "
            f"over {base.epochs} epochs; {amortised * 1e3:.1f} vs {times['baseline'] * 1e3:.1f} ms"),
        Row("sparse_kd_step / baseline_step [tiny, teacher forward every step, as with augmentation]",
            times["sparse_kd per step"] / times["baseline"], "ratio", 1.40,
            f"teacher in inference mode; {times['sparse_kd per step'] * 1e3:.1f} vs {times['baseline'] * 1e3:.1f} ms"),
        Row("sparse_kd_step / baseline_step [tiny, teacher forward every step, compiled teacher]",
            times["sparse_kd per step compiled"] / times["baseline"], "ratio", 1.25,
            f"the teacher's body compiled (compile: true), the student eager; "
            f"{times['sparse_kd per step compiled'] * 1e3:.1f} vs {times['baseline'] * 1e3:.1f} ms"),
        Row("default_kd_step / baseline_step [tiny, digits]", times["default_kd"] / times["baseline"], "ratio", 1.03,
            f"virtual teacher; {times['default_kd'] * 1e3:.1f} vs {times['baseline'] * 1e3:.1f} ms"),
    ]


def data_rows(quick: bool) -> list[Row]:
    """Event frames cached versus made every epoch, and held tensors versus a DataLoader."""
    from rekd.datasets import DATASETS, batches, load_dataset
    from rekd.datasets.frames import events_to_frames
    from rekd.datasets.ndigits import SENSOR_SIZE, event_store, sample_events

    rows = []
    cfg = TrainConfig(dataset="ndigits").resolved(DATASETS["ndigits"].default_timesteps)
    start = time.perf_counter()
    data = load_dataset(cfg)  # cached frames: one file read
    cached_load = time.perf_counter() - start
    events, labels = event_store(cfg.cache_dir)
    n = len(labels) if not quick else 400
    start = time.perf_counter()
    events_to_frames((sample_events(events, i) for i in range(n)), n, SENSOR_SIZE, cfg.timesteps, 1, "bench")
    framing = (time.perf_counter() - start) * len(labels) / n
    frames_bytes = sum(s.x.element_size() * s.x.nelement() for s in (data.train, data.val, data.test))
    epoch = epoch_time(cfg, data)
    rows.append(Row("ndigits epoch, frames made every epoch / cached", (epoch + framing) / (epoch + cached_load),
                    "ratio", None, f"framing {framing:.2f} s per pass over {len(labels)} samples, epoch {epoch:.2f} s; "
                    f"the cache costs {frames_bytes / 2**20:.1f} MiB"))

    rows.append(dvs_frames_row(quick))

    from torch.utils.data import DataLoader, TensorDataset
    digits = load_dataset(TrainConfig().resolved(4))
    generator = torch.Generator().manual_seed(0)
    held = median_time(lambda: [None for _ in batches(digits.train, 32, generator, drop_last=True)], 1, 5)
    loader = DataLoader(TensorDataset(digits.train.x, digits.train.y), batch_size=32, shuffle=True, drop_last=True)
    loaded = median_time(lambda: [None for _ in loader], 1, 5)
    rows.append(Row("digits batches: DataLoader / tensors held in memory", loaded / held, "ratio", None,
                    f"{held * 1e3:.1f} vs {loaded * 1e3:.1f} ms per epoch of batches"))
    return rows


def dvs_frames_row(quick: bool) -> Row:
    """dvsgesture: frames read from the cache versus made from the events again (synthetic recordings in
    tonic's layout; the real release is not on this machine)."""
    from rekd.datasets import load_dataset
    from rekd.datasets.synthetic import make_dvsgesture_folder

    with tempfile.TemporaryDirectory(prefix="rekd-bench-dvs-") as tmp:
        root = make_dvsgesture_folder(Path(tmp) / "data", users=10, events=2000 if quick else 20000)
        cfg = TrainConfig(dataset="dvsgesture", data_root=str(root), cache_dir=str(Path(tmp) / "cache"),
                          downsample=4).resolved(16)
        start = time.perf_counter()
        data = load_dataset(cfg)  # first time: events -> frames, written to the cache
        made = time.perf_counter() - start
        start = time.perf_counter()
        load_dataset(cfg)
        cached = time.perf_counter() - start
        epoch = epoch_time(cfg, data)
        size = sum(s.x.element_size() * s.x.nelement() for s in (data.train, data.val, data.test))
    return Row("dvsgesture epoch, frames made every epoch / cached [synthetic, T=16, 32x32]",
               (epoch + made) / (epoch + cached), "ratio", None,
               f"framing {made:.2f} s, cache read {cached:.3f} s, epoch {epoch:.2f} s over {len(data.train)} samples; "
               f"the cache costs {size / 2**20:.1f} MiB")


def epoch_time(cfg: TrainConfig, data) -> float:
    from rekd.train.loop import train
    result = train(dataclasses.replace(cfg, epochs=1), data=data)
    return result.final["epoch_time_s"]


def harness_overhead(quick: bool, concurrency: int) -> Row:
    """Wall time of a search of N trials / (the same trials run bare in one process / concurrency).

    The detail splits the search's wall time by the Optuna study's record of each trial (from the suggestion
    to the last result): the time before the first trial (Ray start, MLflow parent run, Tune set-up), the
    time after the last one (summary, plots, shutdown), and how much longer the trials took under Tune than
    bare (actor start-up, reports, checkpoints, logging and the CPU Ray's own processes take); the rest is
    time between trials.
    """
    from rekd.datasets import load_dataset
    from rekd.search.driver import run_search
    from rekd.search.ray_session import start_ray
    from rekd.search.plan import make_plan
    from rekd.tracking.store import open_store
    from rekd.train.loop import resolve, train

    # Searches run on a Ray that is already up (`ray job submit` to a cluster); `make run` starts a private
    # one first, whose start-up is measured on its own.
    start = time.perf_counter()
    start_ray()
    ray_start = time.perf_counter() - start
    trials, epochs = (2 * concurrency, 8) if quick else (6 * concurrency, 24)
    with tempfile.TemporaryDirectory(prefix="rekd-bench-") as storage:
        plan = make_plan("baseline", num_samples=trials, epochs=epochs, max_concurrency=concurrency,
                         storage_path=storage, name="bench").with_study(grace_period=epochs)  # ASHA stops nothing
        data = load_dataset(plan.base)
        # Opened before the clock starts, as the command line does before Ray: a new store's schema is
        # MLflow's cost, not the search harness's.
        store = open_store(plan.tracking_uri, plan.experiment)
        started = time.time()
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
            run_search(plan, data, store)
        ended = time.time()
        import ray
        ray.shutdown()
        import optuna
        study = optuna.load_study(study_name="bench", storage=f"sqlite:///{storage}/bench/optuna.db")
        params = {t.number: t.params for t in study.trials}
        # From the searcher's suggestion to the trial's last result: start-up on the actor included.
        spans = [(t.datetime_start.timestamp(), t.datetime_complete.timestamp()) for t in study.trials]
    torch.set_num_threads(1)  # as each Ray trial runs (one CPU per trial)
    bare = []
    for number in sorted(params):
        start = time.perf_counter()
        train(resolve(plan.base.with_overrides(**params[number])), data=data)
        bare.append(time.perf_counter() - start)
    torch.set_num_threads(os.cpu_count() or 1)
    search_wall, bare_total = ended - started, sum(bare)
    before = min(s for s, _ in spans) - started
    after = ended - max(e for _, e in spans)
    in_tune = sum(e - s for s, e in spans)
    gaps = search_wall - before - after - (in_tune / concurrency)
    return Row(f"search wall / (bare trials / concurrency) [{trials} trials of ~{bare_total / trials:.1f} s, "
               f"{concurrency} at once, Ray running]", search_wall / (bare_total / concurrency), "ratio", 1.15,
               f"search {search_wall:.1f} s, bare {bare_total:.1f} s; before the first trial {before:.1f} s, after "
               f"the last {after:.1f} s, trials {in_tune / bare_total:.2f}x their bare time, gaps {gaps:.1f} s; "
               f"a private Ray takes another {ray_start:.1f} s to start")

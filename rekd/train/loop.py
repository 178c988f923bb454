"""One training run, top to bottom, for the three modes: baseline, sparse_kd (Eq. 5), default_kd (Eq. 7).

`train(cfg, on_epoch=...)` reports one flat metrics dict per epoch through the callback and imports
neither Ray nor MLflow: the Tune trainable and the trackers are thin layers around it. With a run_dir
it writes a checkpoint after every epoch and resumes from one that is already there.
`python -m rekd.train MODE ...` is the command-line front (rekd/train/__main__.py).
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from rekd.train.checkpoint import read_checkpoint, restore, save_checkpoint
from rekd.config import TrainConfig
from rekd.datasets import DataSplits, Split, batches, dataset_spec, load_dataset
from rekd.snn.energy import SpikeMonitor
from rekd.errors import UsageError
from rekd.snn.losses import cross_entropy_loss, default_kd_loss, sparse_kd_loss
from rekd.snn.models import ARCHS, SpikingNet, build_model
from rekd.snn.structure import Structure, connection_counts
from rekd.train.optim import Optimization, for_device
from rekd.registry import lookup
from rekd.snn.teachers import (PrunedTeacher, baseline_config, cpu_weights, load_cached_teacher, store_generation,
                               store_teacher, teacher_path)

OnEpoch = Callable[[dict], None]

# mode -> (student logits, targets, teacher logits or None, config) -> (loss, parts)
OBJECTIVES = {
    "baseline": lambda s, y, t, c: cross_entropy_loss(s, y),
    "sparse_kd": lambda s, y, t, c: sparse_kd_loss(s, t, y, alpha=c.alpha, temperature=c.temperature,
                                                   reduction=c.kd_reduction),
    "default_kd": lambda s, y, t, c: default_kd_loss(
        s, y, confidence=c.confidence, alpha=c.alpha, temperature=c.temperature, reduction=c.kd_reduction),
}


class NonFiniteLoss(RuntimeError):
    """The training loss or the weights became NaN or infinite: the run cannot go on."""


@dataclass
class TrainResult:
    config: TrainConfig  # resolved
    model: SpikingNet
    history: list[dict]  # one metrics dict per epoch

    @property
    def final(self) -> dict:
        return self.history[-1]


def resolve(cfg: TrainConfig) -> TrainConfig:
    """Fill dataset-dependent defaults and check names and values against the registries and this machine."""
    spec = dataset_spec(cfg.dataset)
    lookup(ARCHS, cfg.arch, "arch")
    select_device(cfg.device)
    cfg = cfg.resolved(spec.default_timesteps)
    if not 1.0 / spec.num_classes < cfg.confidence < 1.0:
        raise UsageError(
            f"confidence={cfg.confidence} is not allowed for {cfg.dataset}; allowed: 1/{spec.num_classes} < confidence < 1"
        )
    return cfg


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"device={name!r} but no CUDA device is available; allowed here: auto | cpu")
    return torch.device(name)


@torch.inference_mode()
def teacher_outputs(teacher: PrunedTeacher, data: DataSplits, split: Split, cfg: TrainConfig,
                    optimization: Optimization) -> torch.Tensor:
    """The frozen teacher's logits for every sample of a split, in sample order: (N, classes)."""
    outputs = []
    with optimization.autocast():
        for x, _ in batches(split, 2 * cfg.batch_size):
            outputs.append(teacher(data.to_input(x, cfg.timesteps)).float())
    return torch.cat(outputs)


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: DataSplits, split: Split, cfg: TrainConfig,
             stats: bool = False) -> tuple[float, dict]:
    """Accuracy on a split, and (with stats) firing rates, SOPs and energy per sample."""
    model.eval()
    correct = torch.zeros((), device=split.y.device)
    monitor = SpikeMonitor(model)
    with monitor if stats else contextlib.nullcontext():
        for x, y in batches(split, 2 * cfg.batch_size):  # no autograd: twice the training batch fits
            logits = model(data.to_input(x, cfg.timesteps))  # (N, classes)
            correct += (logits.argmax(-1) == y).sum()
    return float(correct) / max(len(split), 1), monitor.summary() if stats else {}


def make_teacher(cfg: TrainConfig, data: DataSplits, weights: Optional[dict]) -> Optional[PrunedTeacher]:
    """sparse_kd's pruned teacher from the given or cached baseline weights; None for the other modes."""
    if cfg.mode != "sparse_kd":
        return None
    if weights is None:
        cached = load_cached_teacher(cfg)
        if cached is None:
            raise UsageError(
                f"sparse_kd needs a trained baseline teacher and none is cached at {teacher_path(cfg)}; "
                "`python -m rekd.train sparse_kd` trains it first"
            )
        weights = cached["weights"]
    return PrunedTeacher(cfg, weights, data.in_channels, data.num_classes, data.resolution)


Forward = Callable[[torch.Tensor], torch.Tensor]  # a network, or its compiled forward pass


def train_step(model: Forward, teacher: Optional[Forward], objective, optimization: Optimization,
               inputs: torch.Tensor, y: torch.Tensor, cfg: TrainConfig,
               teacher_logits: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One optimizer step; returns (loss, ce, kd, correct) summed over the batch, still on the device.

    The teacher's logits are computed here unless they are given (precomputed for data without augmentation).
    """
    with optimization.autocast():
        logits = model(inputs)  # (N, classes)
        if teacher_logits is None and teacher is not None:
            teacher_logits = teacher(inputs)
    loss, parts = objective(logits.float(), y, teacher_logits, cfg)
    optimization.step(loss)
    n = len(y)
    # Sums stay on the device: one host sync per epoch, not per step.
    return torch.stack([loss.detach() * n, parts["ce"] * n, parts["kd"] * n, (logits.argmax(-1) == y).sum().float()])


def generation_seed(seed: int, generation: int) -> int:
    """Generation 1 draws from the run's seed; each later one from its own stream (not a replay of the first)."""
    return seed + (generation - 1) * 2**32


def train(
    cfg: TrainConfig,
    *,
    data: Optional[DataSplits] = None,
    teacher_weights: Optional[dict] = None,
    on_epoch: Optional[OnEpoch] = None,
    run_dir: Optional[Path] = None,
    progress: bool = False,
) -> TrainResult:
    """Train one SNN as `cfg` says, every generation in turn; report a flat metrics dict per epoch (its
    `epoch` counts across generations, `generation` says which); checkpoint into run_dir, resume from it.

    Generation 1's teacher is the given (or cached) baseline, pruned at prune_ratio; generation g's is
    generation g-1's student, pruned at prune_ratio (rekd.snn.teachers.PrunedTeacher either way).
    """
    device = select_device(cfg.device)
    cfg = for_device(resolve(cfg), device)  # compile and amp here, where the device is known
    data = (data if data is not None else load_dataset(cfg)).to(device)
    saved = read_checkpoint(run_dir, cfg)
    history = list(saved["history"]) if saved else []
    done = int(saved["epoch"]) if saved else 0  # epochs completed, all generations
    resumed, inherited, first = None, None, 1
    if saved is not None and (done % cfg.epochs or done == cfg.total_epochs):  # inside a generation (or done)
        first, resumed = (done - 1) // cfg.epochs + 1, saved
        teacher_weights = saved["teacher"] if first > 1 else teacher_weights
    elif saved is not None:  # saved at the end of a generation: the next starts, taught by the student saved
        first = done // cfg.epochs + 1
        teacher_weights, inherited = saved["model"], saved.get("structure", {}).get("masks")
    model = None
    for generation in range(first, cfg.generations + 1):
        model, structure = train_generation(
            cfg, generation, data, device, teacher_weights, history, resumed=resumed,
            inherited=inherited if cfg.inherit_mask else None, on_epoch=on_epoch, run_dir=run_dir, progress=progress)
        teacher_weights = cpu_weights(model)
        inherited = structure.masks if structure is not None else None
        resumed = None
        if cfg.generations > 1:  # each generation's student, for whoever wants to teach with it again
            store_generation(cfg, generation, teacher_weights, history[-1]["val_acc"])
    return TrainResult(cfg, model, history)


def train_generation(cfg: TrainConfig, generation: int, data: DataSplits, device: torch.device,
                     teacher_weights: Optional[dict], history: list[dict], *, resumed: Optional[dict],
                     inherited: Optional[dict], on_epoch: Optional[OnEpoch], run_dir: Optional[Path],
                     progress: bool):
    """One generation: a fresh student (weights, optimizer, masks) taught by its teacher for cfg.epochs, or
    continued from `resumed`, a checkpoint taken inside it. Appends to `history`; returns (model, structure)."""
    seed = generation_seed(cfg.seed, generation)
    torch.manual_seed(seed)
    layout = torch.channels_last if cfg.channels_last else torch.preserve_format
    model = build_model(cfg, data.in_channels, data.num_classes, data.resolution).to(device, memory_format=layout)
    teacher = make_teacher(cfg, data, teacher_weights)
    teacher_info = {}
    if teacher is not None:
        teacher.to(device, memory_format=layout)
        teacher_info = {"teacher_sparsity": teacher.sparsity,
                        "teacher_val_acc": evaluate(teacher.net, data, data.val, cfg)[0]}
        if cfg.eval_test:  # final runs and reproductions report the pruned teacher as it is, on test
            teacher_info["teacher_test_acc"] = evaluate(teacher.net, data, data.test, cfg)[0]
    objective = lookup(OBJECTIVES, cfg.mode, "mode")
    steps_per_epoch = max(len(data.train) // cfg.batch_size, 1)
    optimization = Optimization(cfg, model, cfg.epochs * steps_per_epoch, device)
    if cfg.structure != "dense":
        optimization.structure = Structure(cfg, model, steps_per_epoch, seed, inherited)
    generator = torch.Generator().manual_seed(seed)  # shuffling and augmentation
    start_epoch = 0
    if resumed is not None:
        restore(resumed, model, optimization, generator)
        start_epoch = int(resumed["epoch"]) - (generation - 1) * cfg.epochs
    offset = (generation - 1) * cfg.epochs  # epochs of the generations before
    # Without augmentation the frozen teacher sees the same input for a sample in every epoch: its logits
    # are computed once, and a distillation step costs a gather instead of a teacher forward pass.
    cached_logits = (teacher_outputs(teacher, data, data.train, cfg, optimization)
                     if teacher is not None and data.augment is None else None)

    compiling = cfg.compile == "true"
    student_forward: Forward = model.compiled() if compiling else model
    teacher_forward: Optional[Forward] = (teacher.compiled() if compiling else teacher) if teacher is not None else None
    compile_pending = compiling  # compilation happens in this process's first step
    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        started = time.perf_counter()
        sums = torch.zeros(4, device=device)  # loss, ce, kd, correct (summed over samples)
        seen = timed = 0
        compile_info = {}
        steps = batches(data.train, cfg.batch_size, generator, drop_last=True, with_index=True)
        if progress:
            from tqdm import tqdm
            steps = tqdm(steps, total=steps_per_epoch, desc=f"epoch {offset + epoch + 1}/{cfg.total_epochs}",
                         leave=False)
        for x, y, idx in steps:
            inputs = data.to_input(x, cfg.timesteps, generator)  # (T, N, C, H, W)
            given = cached_logits[idx] if cached_logits is not None else None
            began = time.perf_counter() if compile_pending else 0.0
            sums += train_step(student_forward, teacher_forward, objective, optimization, inputs, y, cfg,
                               teacher_logits=given)
            seen += len(y)
            if compile_pending:  # the compiling step: timed alone, kept out of the throughput
                compile_pending = False
                sums.sum().item()
                compile_info = {"compile_time_s": time.perf_counter() - began}
                started += compile_info["compile_time_s"]
                print(f"torch.compile: the {'student and teacher' if teacher_forward is not None else 'network'} "
                      f"compiled in {compile_info['compile_time_s']:.1f} s (first training step)", file=sys.stderr,
                      flush=True)
            else:
                timed += len(y)
        train_time = time.perf_counter() - started
        loss_sum, ce_sum, kd_sum, correct = sums.tolist()

        val_acc, spike_stats = evaluate(model, data, data.val, cfg, stats=True)
        masks = optimization.structure.masks if optimization.structure is not None else None
        metrics = {
            "epoch": offset + epoch + 1, "generation": generation,
            "train_loss": loss_sum / seen, "train_ce": ce_sum / seen, "train_kd": kd_sum / seen,
            "train_acc": correct / seen, "val_acc": val_acc, "lr": optimization.lr,
            "epoch_time_s": train_time, "samples_per_s": timed / train_time if timed else float("nan"),
            **connection_counts(model, masks), **teacher_info, **compile_info, **spike_stats,
        }
        if cfg.eval_test:
            metrics["test_acc"] = evaluate(model, data, data.test, cfg)[0]
        history.append(metrics)
        # Spikes stop NaN in the forward pass (NaN never crosses the threshold), but surrogate gradients
        # carry it into the weights: check those too, once per epoch.
        finite = math.isfinite(metrics["train_loss"]) and bool(
            torch.stack([p.detach().float().sum() for p in model.parameters()]).isfinite().all())
        if not finite:
            metrics["diverged"] = 1.0  # the callback learns it before the NonFiniteLoss below
        if finite and run_dir is not None:  # never overwrite the last good checkpoint with a diverged one
            save_checkpoint(Path(run_dir), cfg, offset + epoch + 1, model, optimization, generator, history,
                            generation=generation, teacher=teacher_weights if generation > 1 else None)
        if on_epoch is not None:
            on_epoch(metrics)
        if not finite:
            raise NonFiniteLoss(f"training diverged in epoch {offset + epoch + 1}: non-finite loss or weights "
                                f"(train_loss={metrics['train_loss']:.4g})")
    return model, optimization.structure


def train_teacher(cfg: TrainConfig, data: Optional[DataSplits] = None, on_epoch: Optional[OnEpoch] = None,
                  progress: bool = False) -> tuple[dict, float]:
    """Train the baseline that becomes cfg's teacher: (CPU weights, final val_acc)."""
    result = train(baseline_config(resolve(cfg)), data=data, on_epoch=on_epoch, progress=progress)
    return cpu_weights(result.model), result.final["val_acc"]


def ensure_teacher(cfg: TrainConfig, data: Optional[DataSplits] = None, on_epoch: Optional[OnEpoch] = None,
                   progress: bool = False) -> dict:
    """The baseline weights sparse_kd distils from: from the teacher cache, or trained now and cached."""
    cfg = resolve(cfg)
    cached = load_cached_teacher(cfg)
    if cached is not None:
        return cached["weights"]
    print(f"no cached teacher for this config: training the baseline ({cfg.teacher_epochs} epochs) -> "
          f"{teacher_path(cfg)}", file=sys.stderr, flush=True)
    weights, val_acc = train_teacher(cfg, data, on_epoch, progress)
    store_teacher(cfg, weights, val_acc)
    return weights


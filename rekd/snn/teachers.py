"""The two re-KD teachers and the cache of trained baselines.

- PrunedTeacher (sparse-KD, Eq. 3-5): a trained baseline SNN of the student's architecture, magnitude-
  pruned at `prune_ratio`, frozen, run without autograd. Ratio 0 is the student as its own teacher.
- The virtual teacher (default-KD, Eq. 6) is a distribution, not a network: rekd.snn.losses.virtual_teacher.

A trained baseline is cached under <cache_dir>/teachers/ by a key over every setting that determines
it, so distillation runs and searches find it instead of training it again. A run of several generations
(rekd.train.loop) also keeps each generation's student there, `...-gen<g>.pt`, keyed by all its settings.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from rekd.storage import load_weights
from rekd.config import TrainConfig
from rekd.snn.models import build_model, freeze_for_inference
from rekd.snn.prune import magnitude_prune
from rekd.storage import load_tensors, save_atomic

# Settings that do not change which network a baseline run produces.
NOT_DETERMINING = ("mode", "cache_dir", "download", "epochs", "eval_test", "device", "amp", "channels_last",
                   "compile", "prune_ratio", "temperature", "alpha", "confidence", "kd_reduction", "data_root",
                   # the teacher is a dense baseline whatever its students learn
                   "structure", "target_sparsity", "sparsity_start_epoch", "sparsity_end_epoch", "prune_every",
                   "regrow", "rewire_fraction", "generations", "inherit_mask")
# Of a whole run's settings, those that do not change the students it produces.
NOT_STUDENT = ("cache_dir", "download", "eval_test", "device", "amp", "channels_last", "compile", "data_root")
EXTERNAL_DATA = ("cifar100", "dvsgesture")  # datasets read from data_root: their location is part of the key


def dense_baseline(cfg: TrainConfig) -> TrainConfig:
    """cfg as a dense baseline of one generation, whatever student cfg trains."""
    return dataclasses.replace(cfg, mode="baseline", structure="dense", target_sparsity=0.0, generations=1,
                               inherit_mask=False)


def baseline_config(cfg: TrainConfig) -> TrainConfig:
    """The config of the baseline run that becomes this run's teacher (a resolved cfg goes in)."""
    return dataclasses.replace(dense_baseline(cfg), epochs=cfg.teacher_epochs or cfg.epochs, eval_test=False)


def teacher_key(cfg: TrainConfig) -> str:
    """A short hash of everything that determines the teacher: dataset, arch, T, neuron, optimizer, seed..."""
    values = {k: v for k, v in cfg.to_dict().items() if k not in NOT_DETERMINING}
    values["teacher_epochs"] = cfg.teacher_epochs or cfg.epochs
    if cfg.dataset in EXTERNAL_DATA:
        values["data_root"] = os.path.abspath(cfg.data_root)
    blob = json.dumps(values, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def teacher_path(cfg: TrainConfig) -> Path:
    return Path(cfg.cache_dir) / "teachers" / f"{cfg.dataset}-{cfg.arch}-{teacher_key(cfg)}.pt"


def load_cached_teacher(cfg: TrainConfig) -> Optional[dict]:
    """{"weights", "config", "val_acc"} of the cached baseline for this config, or None."""
    path = teacher_path(cfg)
    return load_tensors(path, "cached teacher") if path.is_file() else None


def cpu_weights(model: nn.Module) -> dict:
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def store_teacher(cfg: TrainConfig, weights: dict, val_acc: float) -> Path:
    entry = {"weights": weights, "config": baseline_config(cfg).to_dict(), "val_acc": float(val_acc)}
    return save_atomic(entry, teacher_path(cfg))


def generation_path(cfg: TrainConfig, generation: int) -> Path:
    """Where a multi-generation run keeps generation g's student: keyed by every setting of the run."""
    values = {k: v for k, v in cfg.to_dict().items() if k not in NOT_STUDENT}
    key = hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cfg.cache_dir) / "teachers" / f"{cfg.dataset}-{cfg.arch}-{key}-gen{generation}.pt"


def store_generation(cfg: TrainConfig, generation: int, weights: dict, val_acc: float) -> Path:
    entry = {"weights": weights, "config": cfg.to_dict(), "generation": generation, "val_acc": float(val_acc)}
    return save_atomic(entry, generation_path(cfg, generation))


class PrunedTeacher(nn.Module):
    """A frozen, magnitude-pruned copy of a trained baseline: logits without autograd."""

    def __init__(self, cfg: TrainConfig, weights: dict, in_channels: int, num_classes: int, resolution: int):
        super().__init__()
        self.net = build_model(cfg, in_channels, num_classes, resolution)
        load_weights(self.net, weights, "teacher weights")
        self.sparsity = magnitude_prune(self.net, cfg.prune_ratio)
        freeze_for_inference(self.net)  # runs every distillation step: the cheap IF forward pass

    def train(self, mode: bool = True) -> "PrunedTeacher":
        return super().train(False)  # a teacher's batch norm keeps its running statistics, always

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (T, N, C, H, W) -> (N, classes)
        return self.net(x)

    def compiled(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The forward pass with the network's body compiled (SpikingNet.compiled), in inference mode."""
        return torch.inference_mode()(self.net.compiled())

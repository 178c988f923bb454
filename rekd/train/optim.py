"""Optimizer, learning-rate schedule, compilation and mixed precision of a run, and the one step that uses them."""
from __future__ import annotations

import dataclasses
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Optional

import torch

from rekd.config import TrainConfig

if TYPE_CHECKING:
    from rekd.snn.structure import Structure


# Architectures that stay eager on CPUs under compile auto: `python -m rekd.bench --only compile` (2-core CPU,
# 2026-11-28) has tiny's compiled step at 0.68x for a 36 s cold compile, paid back after ~8,500 steps where a
# digits run takes 320; resnet18's at 0.82x for 79 s, paid back after ~160 steps (a tenth of a CIFAR epoch).
CPU_EAGER_ARCHS = ("tiny",)


def for_device(cfg: TrainConfig, device: torch.device) -> TrainConfig:
    """compile and amp as they will run on this device (the recorded config says what ran).

    compile auto = on CUDA; on CPUs for every architecture but the ones whose compile time a run never earns
    back (CPU_EAGER_ARCHS). amp auto = bf16 where the step is compiled: on an H100 (resnet18, T=4, batch
    128) bf16 autocast measured slower than fp32 in eager mode (2,749 against 4,613 images/s) and faster
    compiled (8,248 against 7,685); the casts around the IF neurons' element-wise ops cost more than bf16
    saves until compilation fuses them. Never on CPUs.
    """
    cuda = device.type == "cuda"
    compile = cfg.compile
    if compile == "auto":
        compile = "true" if cuda or cfg.arch not in CPU_EAGER_ARCHS else "false"
    amp = cuda and (cfg.amp if cfg.amp is not None else compile == "true")
    return dataclasses.replace(cfg, compile=compile, amp=amp)


class Optimization:
    """SGD with momentum or Adam, cosine or constant schedule stepped per batch, AMP on CUDA.

    bf16 autocast where the GPU has it; fp16 with loss scaling where it does not; fp32 on CPU.
    """

    def __init__(self, cfg: TrainConfig, model: torch.nn.Module, total_steps: int, device: torch.device):
        params = model.parameters()
        if cfg.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        else:
            self.optimizer = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        if cfg.schedule == "cosine":  # annealed to 0 at the last step
            self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=max(total_steps, 1))
        else:
            self.scheduler = torch.optim.lr_scheduler.ConstantLR(self.optimizer, factor=1.0, total_iters=0)
        self.device_type = device.type
        self.use_amp = bool(for_device(cfg, device).amp)
        self.amp_dtype = torch.bfloat16 if self.use_amp and torch.cuda.is_bf16_supported() else torch.float16
        # A sparse student's masks (rekd.snn.structure.Structure): updated and re-applied around every step.
        self.structure: Optional["Structure"] = None
        self.scaler: Optional[torch.amp.GradScaler] = (
            torch.amp.GradScaler("cuda") if self.use_amp and self.amp_dtype == torch.float16 else None
        )

    def autocast(self) -> AbstractContextManager:
        return torch.autocast(self.device_type, dtype=self.amp_dtype, enabled=self.use_amp)

    def step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            if self.structure is not None:
                self.structure.before_step(self.optimizer)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            if self.structure is not None:
                self.structure.before_step(self.optimizer)
            self.optimizer.step()
        if self.structure is not None:
            self.structure.after_step()
        self.scheduler.step()

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else {}}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])

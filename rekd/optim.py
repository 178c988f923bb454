"""Optimizer, learning-rate schedule and mixed precision of a run, and the one step that uses them."""
from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Optional

import torch

from rekd.config import TrainConfig


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
        self.use_amp = cfg.amp and device.type == "cuda"
        self.amp_dtype = torch.bfloat16 if self.use_amp and torch.cuda.is_bf16_supported() else torch.float16
        self.scaler: Optional[torch.amp.GradScaler] = (
            torch.amp.GradScaler("cuda") if self.use_amp and self.amp_dtype == torch.float16 else None
        )

    def autocast(self) -> AbstractContextManager:
        return torch.autocast(self.device_type, dtype=self.amp_dtype, enabled=self.use_amp)

    def step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
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

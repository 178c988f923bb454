"""Per-epoch checkpoints a run resumes from: weights, optimizer, scheduler, epoch, RNG states, config.

Saved atomically with torch.save and read back with weights_only=True (rekd.storage): tensors and plain
values only. A checkpoint of another architecture or dataset is refused with one clear line.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn

from rekd.config import TrainConfig
from rekd.errors import UsageError
from rekd.train.optim import Optimization
from rekd.storage import load_tensors, load_weights, save_atomic

FORMAT = "rekd-checkpoint-1"
FILENAME = "last.pt"
# Settings that change the shape of the weights: a checkpoint must agree on all of them.
SHAPE_KEYS = ("arch", "dataset", "downsample")


def save_checkpoint(
    run_dir: Path, cfg: TrainConfig, epoch: int, model: nn.Module, optimization: Optimization,
    generator: torch.Generator, history: list[dict],
) -> Path:
    state = {
        "format": FORMAT,
        "config": cfg.to_dict(),
        "epoch": epoch,  # epochs completed
        "model": model.state_dict(),
        "optimization": optimization.state_dict(),
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "data": generator.get_state(),
        },
        "history": history,
    }
    return save_atomic(state, run_dir / FILENAME)


def resume(run_dir: Optional[Path], cfg: TrainConfig, model: nn.Module, optimization: Optimization,
           generator: torch.Generator) -> tuple[list[dict], int]:
    """Restore a run from run_dir's checkpoint if there is one: (history so far, epochs completed)."""
    if run_dir is None or not (Path(run_dir) / FILENAME).is_file():
        return [], 0
    state = load_checkpoint(Path(run_dir) / FILENAME, cfg)
    load_weights(model, state["model"], f"checkpoint {run_dir}")
    optimization.load_state_dict(state["optimization"])
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    generator.set_state(state["rng"]["data"])
    return list(state["history"]), int(state["epoch"])


def load_checkpoint(path: Path, cfg: Optional[TrainConfig] = None) -> dict:
    """A checkpoint's contents, checked to be rekd's format and (if cfg is given) the same network."""
    state = load_tensors(path, "checkpoint")
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UsageError(f"checkpoint {str(path)!r} is not a rekd checkpoint (format {FORMAT})")
    if cfg is not None:
        for key in SHAPE_KEYS:
            theirs = state["config"].get(key)
            if theirs != getattr(cfg, key):
                raise UsageError(
                    f"checkpoint {str(path)!r} was made with {key}={theirs!r}; this run needs {key}={getattr(cfg, key)!r}"
                )
    return state

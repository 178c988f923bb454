"""Per-epoch checkpoints a run resumes from: weights, optimizer, scheduler, epoch, RNG states, config, and for
sparse students the masks and schedule position, for a later generation the weights of its teacher.

Saved atomically with torch.save and read back with weights_only=True (rekd.storage): tensors and plain
values only. A checkpoint of another architecture or dataset is refused with one clear line.
"""
from __future__ import annotations

import dataclasses
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
# Settings that change the shape of the weights or what the checkpoint holds (masks, a generation's
# teacher): a checkpoint must agree on all of them.
SHAPE_KEYS = ("arch", "dataset", "downsample", "structure", "generations")
DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}


def save_checkpoint(
    run_dir: Path, cfg: TrainConfig, epoch: int, model: nn.Module, optimization: Optimization,
    generator: torch.Generator, history: list[dict], *, generation: int = 1, teacher: Optional[dict] = None,
) -> Path:
    """`epoch` counts the run's epochs completed over all generations; `teacher` is the weights a later
    generation's teacher was pruned from (its predecessor student), so a resumed generation needs nothing else."""
    state = {
        "format": FORMAT,
        "config": cfg.to_dict(),
        "epoch": epoch,  # epochs completed
        "generation": generation,
        "model": model.state_dict(),
        "optimization": optimization.state_dict(),
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "data": generator.get_state(),
        },
        "history": history,
    }
    if optimization.structure is not None:  # a sparse student's masks and the position in its schedule
        state["structure"] = optimization.structure.state_dict()
    if teacher is not None:
        state["teacher"] = teacher
    return save_atomic(state, run_dir / FILENAME)


def read_checkpoint(run_dir: Optional[Path], cfg: TrainConfig) -> Optional[dict]:
    """run_dir's checkpoint, checked against cfg, or None when there is none."""
    if run_dir is None or not (Path(run_dir) / FILENAME).is_file():
        return None
    return load_checkpoint(Path(run_dir) / FILENAME, cfg)


def restore(state: dict, model: nn.Module, optimization: Optimization, generator: torch.Generator) -> None:
    """Put a run back where its checkpoint left it: weights, optimizer, masks and every random stream."""
    load_weights(model, state["model"], "checkpoint")
    optimization.load_state_dict(state["optimization"])
    if optimization.structure is not None:
        if "structure" not in state:
            raise UsageError("the checkpoint is of a dense student; this run trains a sparse one (structure="
                             f"{optimization.structure.cfg.structure})")
        optimization.structure.load_state_dict(state["structure"])
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    generator.set_state(state["rng"]["data"])


def load_checkpoint(path: Path, cfg: Optional[TrainConfig] = None) -> dict:
    """A checkpoint's contents, checked to be rekd's format and (if cfg is given) the same network."""
    state = load_tensors(path, "checkpoint")
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UsageError(f"checkpoint {str(path)!r} is not a rekd checkpoint (format {FORMAT})")
    if cfg is not None:
        for key in SHAPE_KEYS:
            theirs = state["config"].get(key, DEFAULTS[key])  # a setting newer than the checkpoint: its default
            if theirs != getattr(cfg, key):
                raise UsageError(
                    f"checkpoint {str(path)!r} was made with {key}={theirs!r}; this run needs {key}={getattr(cfg, key)!r}"
                )
    return state

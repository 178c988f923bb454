"""Writing and reading tensors and checkpoints safely: atomic writes, and loads that never unpickle code.

Every file rekd reads back (checkpoints, teacher weights, cached frames) goes through `load_tensors`,
which uses torch.load(weights_only=True): tensors, dicts, lists and plain values only. A file that
carries any other pickled object is refused with a UsageError instead of being executed.
"""
from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from rekd.errors import UsageError


def save_atomic(obj: Any, path: str | os.PathLike) -> Path:
    """torch.save to a temporary file in the same folder, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_tensors(path: str | os.PathLike, what: str, map_location: Any = "cpu") -> Any:
    """torch.load with weights_only=True; a corrupt or unsafe file becomes one clear UsageError."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{what} {str(path)!r} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        if "GLOBAL" in text or "Unsupported global" in text:  # a class or function the file wants to build
            raise UsageError(
                f"{what} {str(path)!r} holds pickled Python objects, which rekd refuses to load "
                "(only tensors and plain values are allowed)"
            ) from None
        raise UsageError(f"{what} {str(path)!r} is corrupt or not a torch file") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"{what} {str(path)!r} is not a readable torch file: {first}") from None


def load_weights(model: torch.nn.Module, weights: dict, source: str) -> None:
    """load_state_dict(strict=True), with a mismatch said as a UsageError rather than a traceback."""
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise UsageError(f"{source} does not fit this network: {first}") from None

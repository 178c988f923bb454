"""What a result was made with: rekd's code version and the versions of the libraries that matter."""
from __future__ import annotations

import importlib.metadata
import platform
import subprocess
from pathlib import Path

import torch

LIBRARIES = ("torch", "torchvision", "spikingjelly", "tonic", "numpy", "scikit-learn", "ray", "optuna", "mlflow")
SOURCE_DIR = Path(__file__).resolve().parent.parent


def code_version() -> str:
    """`git describe` of the source tree (with -dirty for uncommitted changes), else the package version."""
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=12"], cwd=SOURCE_DIR,
            capture_output=True, text=True, timeout=5, check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return f"rekd {package_version('rekd')}"


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def provenance() -> dict[str, str]:
    info = {
        "code_version": code_version(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
    }
    info.update({f"version/{name}": package_version(name) for name in LIBRARIES})
    return info

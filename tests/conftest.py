"""Shared fixtures: a cache folder per test session, and small datasets in their real on-disk layouts."""
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from rekd.datasets.synthetic import make_cifar100_folder, make_dvsgesture_folder  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def cache_dir(tmp_path_factory) -> str:
    """One cache for the session (never the user's own): ndigits events and frames are generated once."""
    path = tmp_path_factory.mktemp("rekd-cache")
    os.environ["REKD_CACHE_DIR"] = str(path)
    return str(path)


@pytest.fixture(scope="session")
def cifar_root(tmp_path_factory) -> Path:
    return make_cifar100_folder(tmp_path_factory.mktemp("cifar"))


@pytest.fixture(scope="session")
def dvs_root(tmp_path_factory) -> Path:
    return make_dvsgesture_folder(tmp_path_factory.mktemp("dvs"))


@pytest.fixture
def own_tmp():
    """A temp folder of the search's own, so that what it leaves there can be seen (short: Ray's socket
    paths inside it must stay under 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="ri-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)

"""Shared fixtures: a cache folder per test session, and small datasets in their real on-disk layouts."""
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

# The session's own temp folder, for everything the tests and the commands they start put there (pytest's
# tmp_path folders included): what is still in it at the end, beside pytest's folders, was left behind by
# rekd or a library it runs, and fails the session. Short, for Ray's socket paths.
SESSION_TMP = Path(tempfile.mkdtemp(prefix="rekd-tests-", dir="/tmp"))
os.environ["TMPDIR"] = str(SESSION_TMP)
tempfile.tempdir = None  # re-read TMPDIR
# Nothing may appear in the checkout either (MLflow's client once wrote artifacts to ./mlruns there).
CHECKOUT = set(os.listdir(ROOT))
TOOL_CACHES = {".pytest_cache", "__pycache__"}

from rekd.datasets.synthetic import make_cifar100_folder, make_dvsgesture_folder  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def cache_dir(tmp_path_factory) -> str:
    """One cache for the session (never the user's own): ndigits events and frames are generated once."""
    path = tmp_path_factory.mktemp("rekd-cache")
    os.environ["REKD_CACHE_DIR"] = str(path)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path / "torchinductor")  # as rekd/__init__ does for REKD_CACHE_DIR
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


def pytest_sessionfinish(session, exitstatus):
    left_in_checkout = sorted(set(os.listdir(ROOT)) - CHECKOUT - TOOL_CACHES)
    # pymp-*: multiprocessing's folder of a process a fault test kills with SIGKILL on purpose, which cannot
    # remove it; not yet traced to the process that makes it.
    left_in_tmp = sorted(p.name for p in SESSION_TMP.iterdir() if not p.name.startswith(("pytest-of-", "pymp-")))
    if left_in_checkout or left_in_tmp:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        print(f"\nleft behind by the tests: in the checkout {left_in_checkout}, in the temp folder "
              f"{SESSION_TMP} {left_in_tmp}", file=sys.stderr)
    elif exitstatus == 0:
        shutil.rmtree(SESSION_TMP, ignore_errors=True)

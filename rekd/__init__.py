"""rekd: hyperparameter search for spiking neural networks trained by reverse knowledge distillation."""
import importlib.util
import os
import sys

__version__ = "0.1.0"

# Import names of the dependencies every command needs (pyproject.toml pins them).
DEPENDENCIES = ("torch", "spikingjelly", "ray", "optuna", "mlflow", "tonic", "yaml", "sklearn")


def _missing_dependencies() -> list[str]:
    return [name for name in DEPENDENCIES if importlib.util.find_spec(name) is None]


# `python -m rekd.X` with an interpreter that has rekd on its path (the repository root) but not its
# dependencies (outside the venv) would end in a ModuleNotFoundError traceback from deep inside; one line
# says what to run instead. While `-m` is locating its module, sys.argv[0] is "-m" (Python docs); a plain
# `import rekd` is left to fail as imports do.
if sys.argv[:1] == ["-m"] and (_missing := _missing_dependencies()):
    _venv = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".venv", "bin", "python")
    _hint = f"run it with {os.path.relpath(_venv)} (set up by `make run`), or activate the venv: " \
            f"source {os.path.relpath(os.path.dirname(_venv))}/activate" if os.path.exists(_venv) else \
        "install rekd first: pip install -e . (or `make run`, which sets up .venv)"
    sys.stderr.write(f"rekd: error: {sys.executable} lacks rekd's dependencies ({', '.join(_missing)}); {_hint}\n")
    raise SystemExit(2)

# torch creates its compile cache (`torchinductor_<user>`) in the temp directory as soon as torch._dynamo is
# imported, which the optimizers do: keep it with rekd's other caches instead.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(
    os.environ.get("REKD_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "rekd"), "torchinductor"))

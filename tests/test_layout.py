"""The package's shape: layers that only import downwards, no import circles, and a training loop that
imports neither Ray nor MLflow (a trial, a final run and a reproduction all run it; only the search needs Ray)."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "rekd"

# Lowest first. A module may import its own layer and those below it, never one above.
LAYERS = [
    {"rekd", "rekd.errors", "rekd.config", "rekd.registry", "rekd.storage", "rekd.provenance", "rekd.stats",
     "rekd.cli", "rekd.locks", "rekd.library_log"},
    {"rekd.datasets"},
    {"rekd.snn"},
    {"rekd.train"},
    {"rekd.tracking"},
    {"rekd.search"},
    {"rekd.evaluate"},
    # Commands over everything: the benchmarks, the local service and UI, and the one-line command modules
    # that keep `python -m rekd.best` and the like where they were.
    {"rekd.bench", "rekd.service", "rekd.ui", "rekd.best", "rekd.export", "rekd.final", "rekd.reproduce", "rekd.unsent",
     "rekd.bench_gpu"},
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The rekd modules a file imports, at any depth of its code (lazy imports inside functions count)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target not in known and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in known and target != name and target.startswith("rekd"):
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(path, set(mods)) for name, path in mods.items()}


def layer_of(module: str) -> int:
    for depth in range(module.count(".") + 1, 0, -1):
        prefix = ".".join(module.split(".")[:depth])
        for i, layer in enumerate(LAYERS):
            if prefix in layer:
                return i
    raise AssertionError(f"{module} is in no layer of tests/test_layout.py: place it")


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in g:
        if v not in index:
            visit(v)
    return found


def test_every_module_sits_in_a_layer_and_imports_only_its_own_or_lower_layers():
    upward = [f"{m} (layer {layer_of(m)}) imports {t} (layer {layer_of(t)})"
              for m, targets in graph().items() for t in sorted(targets) if layer_of(t) > layer_of(m)]
    assert upward == []


def test_no_import_circles():
    assert cycles(graph()) == []


def test_the_checks_catch_what_they_are_for():
    g = {"rekd.a": {"rekd.b"}, "rekd.b": {"rekd.c"}, "rekd.c": {"rekd.a"}, "rekd.d": set()}
    assert cycles(g) == [["rekd.a", "rekd.b", "rekd.c"]]
    assert layer_of("rekd.train.loop") == 3 and layer_of("rekd.search.driver") == 5
    source = PACKAGE / "snn" / "losses.py"
    assert "rekd.search.driver" not in imports_of(source, set(modules()))
    with pytest.raises(AssertionError, match="in no layer"):
        layer_of("rekd_other.thing")


@pytest.mark.parametrize("module", ["rekd.train.loop", "rekd.train.__main__", "rekd.snn.teachers",
                                    "rekd.tracking.runs", "rekd.tracking.writer", "rekd.tracking.store",
                                    "rekd.evaluate.best", "rekd.evaluate.final"])
def test_training_and_mlflow_writing_load_without_ray(module):
    """Imported in a fresh interpreter: the loop imports neither Ray nor MLflow; MLflow's side of tracking,
    and the commands that only read or write MLflow (best, final), load without Ray (only the Tune callback
    and the search need it)."""
    banned = ("ray", "mlflow") if module.startswith(("rekd.train", "rekd.snn")) else ("ray",)
    code = (f"import importlib, sys; importlib.import_module({module!r}); "
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {set(banned)!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", f"{module} loads {out.strip()}"

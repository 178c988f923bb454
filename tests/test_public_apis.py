"""rekd reads and writes no private attribute of Ray, Optuna or MLflow and imports none of their private
modules, so that their upgrades break it only where their public APIs change.

Every `.py` under rekd/ is parsed and checked for:
- an attribute `x._name` (one leading underscore, not a dunder) on anything but `self`, `cls` or a name of
  rekd's own (a module-level class, function or variable of the file, or a name imported from rekd), or
  reached by name through getattr/setattr/hasattr/delattr;
- `self._name` / `cls._name` in a class derived from a Ray, Optuna or MLflow class, where `_name` is one of
  that base's own private fields or members (the subclass's own private fields are its business);
- an import of a `_`-prefixed module or name from ray, optuna or mlflow;
- a `_`-prefixed keyword argument in a call (how private parameters such as ray.init's are passed).
What has no public route is allowed below, once, with the reason.
"""
from __future__ import annotations

import ast
import importlib
import inspect
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "rekd"
GUARDED = ("ray", "optuna", "mlflow")

# namedtuple's own public API is spelled with one underscore (so as not to clash with field names).
NAMEDTUPLE_API = {"_replace", "_asdict", "_make", "_fields", "_field_defaults"}

# (file, the flagged expression or keyword as ast.unparse writes it) -> why it has no public route
ALLOWED = {
    ("rekd/search/ray_session.py", "_node_ip_address"):
        "binds the private Ray to 127.0.0.1 so that no other process or machine finds or joins it; ray.init "
        "(ray 2.60) offers it only as this private keyword (`ray start --node-ip-address` is for a separate "
        "cluster)",
    ("rekd/datasets/cifar100.py", "np._core"):
        "the CIFAR-100 release's pickles name numpy's private array reconstructors; the restricted unpickler "
        "maps exactly those globals (numpy, not Ray/Optuna/MLflow)",
    ("rekd/datasets/cifar100.py", "np._core.multiarray._reconstruct"): "as np._core above",
    ("rekd/datasets/cifar100.py", "np._core.numeric._frombuffer"): "as np._core above",
}


def private(name: str | None) -> bool:
    return bool(name) and name.startswith("_") and not name.startswith("__")


def guarded(module: str) -> bool:
    return module.split(".")[0] in GUARDED


def violations(source: str, path: str = "<planted>", namespace: dict | None = None) -> list[str]:
    """What `source` (the file at `path`, relative to the repository) does against the rules, allowed ones
    left out. `namespace`: its module's globals, for the classes it derives from Ray/Optuna/MLflow ones."""
    tree = ast.parse(source)
    found = []
    ours = {"self", "cls"} | own_names(tree)

    def flag(node: ast.AST, what: str, expression: str) -> None:
        if (path, expression) not in ALLOWED:
            found.append(f"{path}:{node.lineno}: {what} {expression}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and private(node.attr) and node.attr not in NAMEDTUPLE_API:
            if not (isinstance(node.value, ast.Name) and node.value.id in ours):
                flag(node, "private attribute", ast.unparse(node))
        elif isinstance(node, ast.Call):
            if (isinstance(node.func, ast.Name) and node.func.id in ("getattr", "setattr", "hasattr", "delattr")
                    and len(node.args) > 1 and isinstance(node.args[1], ast.Constant)
                    and isinstance(node.args[1].value, str) and private(node.args[1].value)):
                flag(node, "private attribute by name", ast.unparse(node))
            for keyword in node.keywords:
                if private(keyword.arg):
                    flag(keyword, "private keyword argument", keyword.arg)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if guarded(alias.name) and any(private(part) for part in alias.name.split(".")):
                    flag(node, "private module import", alias.name)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level and guarded(node.module):
            for alias in node.names:
                dotted = f"{node.module}.{alias.name}"
                if any(private(part) for part in dotted.split(".")):
                    flag(node, "private import", dotted)
    if namespace is not None:
        found += inherited_private_uses(tree, path, namespace)
    return found


def own_names(tree: ast.Module) -> set[str]:
    """The names a module defines at its top level, and those it imports from rekd."""
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for target in targets for t in ast.walk(target) if isinstance(t, ast.Name)}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").split(".")[0] == "rekd"):
            names |= {a.asname or a.name for a in node.names}
    return names


def inherited_private_uses(tree: ast.Module, path: str, namespace: dict) -> list[str]:
    """`self._x` / `cls._x` in the module's classes where `_x` belongs to a Ray/Optuna/MLflow base class."""
    found = []
    for node in tree.body:
        cls = namespace.get(node.name) if isinstance(node, ast.ClassDef) else None
        if not inspect.isclass(cls):
            continue
        theirs = set()
        for base in cls.__mro__[1:]:
            if guarded(base.__module__):
                theirs |= private_members(base)
        for inner in ast.walk(node):
            if (isinstance(inner, ast.Attribute) and inner.attr in theirs and isinstance(inner.value, ast.Name)
                    and inner.value.id in ("self", "cls") and (path, ast.unparse(inner)) not in ALLOWED):
                found.append(f"{path}:{inner.lineno}: private attribute of {cls.__name__}'s base "
                             f"{ast.unparse(inner)}")
    return found


def private_members(cls: type) -> set[str]:
    """The private names a class defines: its members, and the fields its code sets or reads on self."""
    names = {name for name in vars(cls) if private(name)}
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # a class without Python source (an extension type)
        return names
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Attribute) and private(node.attr) and isinstance(node.value, ast.Name)
                and node.value.id == "self"):
            names.add(node.attr)
    return names


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def derives_from_imports(tree: ast.Module) -> bool:
    """Whether a top-level class of the module has a base it imported from Ray, Optuna, MLflow or rekd (a rekd
    class may itself derive from theirs): only such modules are imported to look at their classes' bases."""
    imported = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update({(a.asname or a.name).split(".")[0]: a.name for a in node.names})
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.update({a.asname or a.name: node.module for a in node.names})
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            for base in node.bases:
                root = base
                while isinstance(root, ast.Attribute):
                    root = root.value
                origin = imported.get(root.id, "") if isinstance(root, ast.Name) else ""
                if guarded(origin) or origin.split(".")[0] == "rekd":
                    return True
    return False


def package_violations() -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = path.read_text()
        tree = ast.parse(source)
        namespace = None
        if path.name != "__main__.py" and derives_from_imports(tree):
            namespace = vars(importlib.import_module(module_name(path)))
        found += violations(source, str(path.relative_to(ROOT)), namespace)
    return found


def test_rekd_uses_no_private_api_of_ray_optuna_or_mlflow():
    assert package_violations() == []


def test_every_allowed_use_is_still_there_and_says_why():
    # An allowance outlives its reason if nothing needs it any more: it must go with the code.
    for (path, expression), reason in ALLOWED.items():
        assert reason.strip(), (path, expression)
        assert expression in (ROOT / path).read_text(), (path, expression)


@pytest.mark.parametrize("source, expected", [
    ("def f(study):\n    return study._storage\n", "private attribute study._storage"),
    ("def f(trial):\n    return trial._trial_id\n", "private attribute trial._trial_id"),
    ("def f(search):\n    search._ot_trials = {}\n", "private attribute search._ot_trials"),
    ("def f(scheduler):\n    return getattr(scheduler, '_trial_info')\n", "private attribute by name"),
    ("def f():\n    return super()._setup_study('max')\n", "private attribute super()._setup_study"),
    ("from ray._private.utils import read_ray_address\n", "private import ray._private.utils.read_ray_address"),
    ("from ray._common import utils\n", "private import ray._common.utils"),
    ("import optuna._imports\n", "private module import optuna._imports"),
    ("from ray.tune.search.util import _set_search_properties_backwards_compatible\n", "private import"),
    ("import ray\nray.init(_node_ip_address='127.0.0.1')\n", "private keyword argument _node_ip_address"),
])
def test_a_planted_private_use_is_flagged(source, expected):
    found = violations(source)
    assert len(found) == 1 and expected in found[0], found


def test_the_same_private_keyword_is_allowed_only_where_its_reason_is():
    source = "import ray\nray.init(_node_ip_address='127.0.0.1')\n"
    assert violations(source, "rekd/search/ray_session.py") == []
    assert violations(source, "rekd/search/driver.py") != []


def test_a_subclass_may_keep_private_fields_of_its_own_but_not_touch_its_ray_bases():
    source = textwrap.dedent("""
        from ray.tune.schedulers import ASHAScheduler

        class Replaying(ASHAScheduler):
            def on_trial_add(self, tune_controller, trial):
                self._seen = trial.trial_id
                return self._trial_info[trial.trial_id], self._metric_op
    """)
    namespace = {}
    exec(compile(source, "<planted>", "exec"), namespace)
    found = violations(source, namespace=namespace)
    assert len(found) == 2 and {f.split()[-1] for f in found} == {"self._trial_info", "self._metric_op"}, found


def test_public_lookalikes_and_rekds_own_private_names_pass():
    source = textwrap.dedent("""
        from ray.tune.search import Searcher
        from rekd.tracking.writer import RunWriter

        class Own:
            def _helper(self):
                return 1

        def f(parts, study, trial, tracker):
            study.tell(trial.number, state=None)
            RunWriter._init_runtime(tracker)
            return parts._replace(netloc=""), Searcher.FINISHED, study.__class__, Own._helper(tracker)
    """)
    assert violations(source) == []

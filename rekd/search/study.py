"""A study: one search_spaces/<name>.yaml, loaded and validated without importing Ray.

A study separates what is searched (`params`: the scientific hyperparameters and their distributions)
from what is held fixed (`fixed`: any TrainConfig setting), and says how to search: the metric and its
mode, the sampler and its seed, ASHA's grace period and reduction factor (its max is `epochs`), how many
trials, how many at once, and what one trial needs. Every mistake is one UsageError that names the file,
the key and what is allowed.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

from rekd.config import TrainConfig, FIELD_TYPES, base_type, parse_value, read_settings_file
from rekd.datasets import dataset_spec
from rekd.errors import UsageError

# The repository's search_spaces/ next to the package; installed images point REKD_SEARCH_SPACES at theirs.
SEARCH_SPACES = Path(os.environ.get("REKD_SEARCH_SPACES") or Path(__file__).resolve().parents[2] / "search_spaces")
DISTRIBUTIONS = ("uniform", "loguniform", "int", "categorical")
SAMPLERS = ("tpe", "random", "nsga2")
MODES = ("max", "min")
TOP_KEYS = ("study", "description", "metric", "mode", "objectives", "fixed", "params", "sampler", "asha",
            "early_stopping", "num_samples", "max_concurrency", "resources", "smoke_test")
# What a study may optimise: the per-epoch metrics every trial reports (rekd.train.loop), on the training
# and validation splits only; the test split is for rekd.final alone.
METRICS = ("val_acc", "train_acc", "train_loss", "energy_uj", "sops", "macs", "density", "connections",
           "firing_rate")
TPE_OPTIONS = ("multivariate", "constant_liar")  # Optuna TPESampler's, offered in a study's sampler block
NSGA2_POPULATION = 8  # NSGA-II's generation size when the study does not say (Optuna's 50 is a whole study here)
SMOKE_KEYS = ("num_samples", "epochs", "teacher_epochs", "max_concurrency")

# --smoke-test runs are tracked in an experiment of their own, rekd-<study>-smoke, so that nothing that looks
# for "the newest search" ever takes a 2-epoch check for a real result.
SMOKE_SUFFIX = "-smoke"


@dataclass(frozen=True)
class Param:
    name: str  # a TrainConfig field
    kind: str  # uniform | loguniform | int | categorical
    low: Optional[float] = None
    high: Optional[float] = None
    choices: tuple = ()


@dataclass(frozen=True)
class Study:
    name: str
    path: Path
    metric: str  # a key of the per-epoch metrics, e.g. val_acc
    mode: str  # max | min
    fixed: dict  # TrainConfig settings shared by every trial
    params: tuple[Param, ...]
    sampler: str = "tpe"
    sampler_seed: int = 0
    population_size: int = NSGA2_POPULATION  # nsga2 only
    multivariate: bool = False  # tpe only: one joint density over the params instead of one per param
    constant_liar: bool = False  # tpe only: running trials count as bad ones, so concurrent proposals spread out
    # Every objective as (metric, mode); the first is `metric`/`mode`. Two or more: a multi-objective study
    # (multi-objective TPE or NSGA-II, MO-ASHA, a Pareto front); one: `metric`/`mode` as before.
    objectives: tuple[tuple[str, str], ...] = ()
    early_stopping: bool = True  # ASHA (MO-ASHA with several objectives) stops trials at rungs; false: every trial runs its budget
    grace_period: int = 1  # ASHA: epochs every trial gets before it can be stopped
    reduction_factor: int = 2  # ASHA: keep the top 1/reduction_factor at each rung
    num_samples: int = 16
    max_concurrency: int = 2
    cpus: float = 1.0  # per trial
    gpus: float = 0.0  # per trial, fractions allowed (rekd.search.ray_session.gpu_request says when it is requested)
    cpu_fallback: bool = False  # a trial given a GPU that torch cannot use trains on CPUs instead of failing
    smoke_test: dict = field(default_factory=dict)
    description: str = ""

    def __post_init__(self):
        if not self.objectives:
            object.__setattr__(self, "objectives", ((self.metric, self.mode),))

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    @property
    def epochs(self) -> int:
        """A trial's full budget (ASHA's max_t): its epochs in all its generations."""
        return self.base_config().total_epochs

    def base_config(self) -> TrainConfig:
        return TrainConfig.from_dict(self.fixed, source=str(self.path))

    def with_overrides(self, **values: Any) -> "Study":
        """A copy with study-level values (num_samples, max_concurrency...) and fixed settings replaced."""
        fixed = {**self.fixed, **values.pop("fixed", {})}
        study = dataclasses.replace(self, fixed=fixed, **values)
        check_consistency(study)
        return study

    def smoke(self) -> "Study":
        """The study shrunk to a CPU run of about a minute: a few trials of one or two epochs."""
        smoke = {"num_samples": 6, "epochs": 2, "teacher_epochs": 2, "max_concurrency": 2, **self.smoke_test}
        fixed = {"epochs": smoke["epochs"]}
        if self.fixed.get("mode") == "sparse_kd":
            fixed["teacher_epochs"] = smoke["teacher_epochs"]
        return self.with_overrides(num_samples=smoke["num_samples"], max_concurrency=smoke["max_concurrency"],
                                   grace_period=1, fixed=fixed)


def study_path(name_or_path: str) -> Path:
    """search_spaces/<name>.yaml for a study name; a path as it is."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    candidate = SEARCH_SPACES / f"{name_or_path}.yaml"
    if not candidate.is_file():
        known = sorted(p.stem for p in SEARCH_SPACES.glob("*.yaml"))
        raise UsageError(f"unknown study {name_or_path!r}; allowed: {', '.join(known)} or a path to a study file")
    return candidate


def load_study(name_or_path: str) -> Study:
    path = study_path(name_or_path)
    raw = read_settings_file(path)
    where = str(path)

    def fail(key: str, message: str) -> UsageError:
        return UsageError(f"{where}: {key}: {message}")

    unknown = sorted(set(raw) - set(TOP_KEYS))
    if unknown:
        raise fail(unknown[0], f"unknown key; allowed: {', '.join(TOP_KEYS)}")
    for key in ("fixed", "params"):
        if key not in raw:
            raise fail(key, "missing; every study states its metric (or objectives), fixed settings and params")
    objectives = parse_objectives(raw, fail)
    fixed = expect(raw["fixed"], dict, "fixed", fail, "a mapping of TrainConfig settings")
    try:
        TrainConfig.from_dict(fixed, source="fixed")
    except UsageError as e:
        raise fail("fixed", str(e).removeprefix("fixed: ")) from None
    params_raw = expect(raw["params"], dict, "params", fail, "a mapping of setting name -> distribution")
    if not params_raw:
        raise fail("params", "empty; a study searches at least one setting")
    params = tuple(parse_param(name, spec, fixed, fail) for name, spec in params_raw.items())
    sampler = expect(raw.get("sampler", {}), dict, "sampler", fail, "a mapping with type and seed")
    asha = expect(raw.get("asha", {}), dict, "asha", fail, "a mapping with grace_period and reduction_factor")
    resources = expect(raw.get("resources", {}), dict, "resources", fail, "a mapping with cpu and gpu")
    smoke = expect(raw.get("smoke_test", {}), dict, "smoke_test", fail, f"a mapping of {', '.join(SMOKE_KEYS)}")
    if "population_size" in sampler and sampler.get("type") != "nsga2":
        raise fail("sampler.population_size", "only for type: nsga2")
    for key in TPE_OPTIONS:
        if key in sampler and sampler.get("type", "tpe") != "tpe":
            raise fail(f"sampler.{key}", "only for type: tpe")
    for block, value, allowed in (("sampler", sampler, ("type", "seed", "population_size", *TPE_OPTIONS)),
                                  ("asha", asha, ("grace_period", "reduction_factor")),
                                  ("resources", resources, ("cpu", "gpu", "cpu_fallback")),
                                  ("smoke_test", smoke, SMOKE_KEYS)):
        extra = sorted(set(value) - set(allowed))
        if extra:
            raise fail(f"{block}.{extra[0]}", f"unknown key; allowed: {', '.join(allowed)}")
    study = Study(
        name=expect(raw.get("study", path.stem), str, "study", fail, "a string"),
        path=path,
        metric=objectives[0][0],
        mode=objectives[0][1],
        objectives=objectives,
        fixed=fixed,
        params=params,
        sampler=choice(sampler.get("type", "tpe"), SAMPLERS, "sampler.type", fail),
        sampler_seed=integer(sampler.get("seed", 0), "sampler.seed", fail, minimum=0),
        population_size=integer(sampler.get("population_size", NSGA2_POPULATION), "sampler.population_size", fail,
                                minimum=2),
        multivariate=expect(sampler.get("multivariate", False), bool, "sampler.multivariate", fail, "true or false"),
        constant_liar=expect(sampler.get("constant_liar", False), bool, "sampler.constant_liar", fail, "true or false"),
        early_stopping=expect(raw.get("early_stopping", True), bool, "early_stopping", fail, "true or false"),
        grace_period=integer(asha.get("grace_period", 1), "asha.grace_period", fail, minimum=1),
        reduction_factor=integer(asha.get("reduction_factor", 2), "asha.reduction_factor", fail, minimum=2),
        num_samples=integer(raw.get("num_samples", 16), "num_samples", fail, minimum=1),
        max_concurrency=integer(raw.get("max_concurrency", 2), "max_concurrency", fail, minimum=1),
        cpus=number(resources.get("cpu", 1), "resources.cpu", fail, minimum=0.01),
        gpus=number(resources.get("gpu", 0), "resources.gpu", fail, minimum=0.0),
        cpu_fallback=expect(resources.get("cpu_fallback", False), bool, "resources.cpu_fallback", fail,
                            "true or false"),
        smoke_test={k: integer(v, f"smoke_test.{k}", fail, minimum=1) for k, v in smoke.items()},
        description=expect(raw.get("description", ""), str, "description", fail, "a string"),
    )
    check_consistency(study, fail)
    return study


def parse_objectives(raw: Mapping, fail) -> tuple[tuple[str, str], ...]:
    """`metric` and `mode` (one objective), or `objectives`: a list of two or more {metric, mode}."""
    if "objectives" not in raw:
        if "metric" not in raw:
            raise fail("metric", "missing; every study states its metric (or objectives), fixed settings and params")
        metric = expect(raw["metric"], str, "metric", fail, f"a per-epoch metric: {', '.join(METRICS)}")
        if metric not in METRICS:
            raise fail("metric", f"{metric!r} is not a per-epoch metric; allowed: {', '.join(METRICS)}")
        return ((metric, choice(raw.get("mode", "max"), MODES, "mode", fail)),)
    for key in ("metric", "mode"):
        if key in raw:
            raise fail(key, "given with objectives; a study has either metric/mode or objectives")
    items = expect(raw["objectives"], list, "objectives", fail, "a list of {metric, mode}, two or more")
    if len(items) < 2:
        raise fail("objectives", f"{len(items)} objective(s); allowed: two or more (one objective is written "
                                 "as metric: and mode:)")
    out = []
    for i, item in enumerate(items):
        key = f"objectives[{i}]"
        item = expect(item, dict, key, fail, "a mapping {metric: NAME, mode: max|min}")
        extra = sorted(set(item) - {"metric", "mode"})
        if extra or "metric" not in item or "mode" not in item:
            raise fail(f"{key}.{extra[0]}" if extra else key,
                       ("unknown key" if extra else "needs both metric and mode") + "; allowed: metric, mode")
        metric = item["metric"]
        if metric not in METRICS:
            raise fail(f"{key}.metric", f"{metric!r} is not a per-epoch metric; allowed: {', '.join(METRICS)}")
        if metric in (m for m, _ in out):
            raise fail(f"{key}.metric", f"{metric!r} is already an objective; each metric once")
        out.append((metric, choice(item["mode"], MODES, f"{key}.mode", fail)))
    return tuple(out)


def objectives_text(objectives) -> str:
    """Objectives as one MLflow param, `val_acc:max,energy_uj:min` (read back by parse_objectives_text)."""
    return ",".join(f"{metric}:{mode}" for metric, mode in objectives)


def parse_objectives_text(text: str) -> Optional[list[tuple[str, str]]]:
    """The (metric, mode) pairs of objectives_text; None when the text is not in that form."""
    pairs = []
    for item in text.split(","):
        metric, _, mode = item.strip().rpartition(":")
        if not metric or mode not in MODES:
            return None
        pairs.append((metric, mode))
    return pairs


def check_consistency(study: Study, fail=None) -> None:
    """Checks that involve several keys; also run after command-line overrides."""
    fail = fail or (lambda key, message: UsageError(f"{study.path}: {key}: {message}"))
    try:
        base = TrainConfig.from_dict(study.fixed, source="fixed")
    except UsageError as e:
        raise fail("fixed", str(e).removeprefix("fixed: ")) from None
    if study.num_samples < 1:
        raise fail("num_samples", f"{study.num_samples} is not allowed; allowed: an integer >= 1")
    if study.grace_period > base.total_epochs:
        raise fail("asha.grace_period", f"{study.grace_period} exceeds epochs={base.total_epochs}; allowed: 1..epochs")
    if any(p.name == "generations" for p in study.params):
        raise fail("params.generations", "cannot be searched: it sets every trial's epoch budget; fix it in fixed")
    if study.gpus > 1 and study.gpus != int(study.gpus):
        raise fail("resources.gpu", f"{study.gpus} is not allowed; allowed: a fraction <= 1 or a whole number")
    clash = sorted(p.name for p in study.params if p.name in study.fixed)
    if clash:
        raise fail(f"params.{clash[0]}", "is also in fixed; a setting is either searched or fixed")
    spec = dataset_spec(base.dataset)
    for param in study.params:
        if param.name == "confidence" and param.kind != "categorical" and param.low <= 1.0 / spec.num_classes:
            raise fail("params.confidence.low",
                       f"{param.low} is not allowed for {base.dataset}; allowed: > 1/{spec.num_classes}")


def parse_param(name: str, spec: Any, fixed: Mapping, fail) -> Param:
    key = f"params.{name}"
    if name not in FIELD_TYPES:
        raise fail(key, f"not a setting; allowed: {', '.join(FIELD_TYPES)}")
    spec = expect(spec, dict, key, fail, "a mapping with type and low/high or choices")
    kind = choice(spec.get("type"), DISTRIBUTIONS, f"{key}.type", fail)
    allowed = ("type", "choices") if kind == "categorical" else ("type", "low", "high")
    extra = sorted(set(spec) - set(allowed))
    if extra:
        raise fail(f"{key}.{extra[0]}", f"unknown key for a {kind} distribution; allowed: {', '.join(allowed)}")
    base, _ = base_type(FIELD_TYPES[name])
    if kind == "categorical":
        choices = expect(spec.get("choices"), list, f"{key}.choices", fail, "a non-empty list")
        if not choices:
            raise fail(f"{key}.choices", "empty; allowed: a non-empty list")
        for value in choices:
            legal(name, value, fixed, f"{key}.choices", fail)
        return Param(name, kind, choices=tuple(choices))
    if base not in (int, float) or (kind == "int" and base is not int):
        raise fail(f"{key}.type", f"{kind} does not fit {name}, which is {base.__name__}; allowed: categorical")
    low = number(spec.get("low"), f"{key}.low", fail)
    high = number(spec.get("high"), f"{key}.high", fail)
    if kind == "int" and (low != int(low) or high != int(high)):
        raise fail(key, "int bounds must be whole numbers")
    if low >= high:
        raise fail(key, f"low={low} must be below high={high}")
    if kind == "loguniform" and low <= 0:
        raise fail(f"{key}.low", f"{low} is not allowed for loguniform; allowed: > 0")
    for bound, value in (("low", low), ("high", high)):
        legal(name, int(value) if base is int else float(value), fixed, f"{key}.{bound}", fail)
    return Param(name, kind, low=float(low), high=float(high))


def legal(name: str, value: Any, fixed: Mapping, key: str, fail) -> None:
    """A value of a searched setting must be one TrainConfig accepts, next to the fixed settings."""
    try:
        TrainConfig.from_dict({**fixed, name: value}, source=key)
    except UsageError as e:
        raise fail(key, str(e).removeprefix(f"{key}: ")) from None


def expect(value: Any, kind: type, key: str, fail, allowed: str) -> Any:
    if not isinstance(value, kind):
        raise fail(key, f"{value!r} has the wrong type; allowed: {allowed}")
    return value


def choice(value: Any, options: tuple, key: str, fail) -> str:
    if value not in options:
        raise fail(key, f"{value!r} is not allowed; allowed: {' | '.join(options)}")
    return value


def integer(value: Any, key: str, fail, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise fail(key, f"{value!r} has the wrong type; allowed: an integer >= {minimum}")
    if value < minimum:
        raise fail(key, f"{value} is not allowed; allowed: an integer >= {minimum}")
    return value


def number(value: Any, key: str, fail, minimum: float = -math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise fail(key, f"{value!r} has the wrong type; allowed: a number")
    if value < minimum:
        raise fail(key, f"{value} is not allowed; allowed: a number >= {minimum}")
    return float(value)


def parse_assignment(item: str) -> tuple[str, Any]:
    """`--set key=value` for a fixed setting, typed by the TrainConfig field."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or key not in FIELD_TYPES:
        raise UsageError(f"--set {item!r}: expected key=value with key one of: {', '.join(FIELD_TYPES)}")
    return key, parse_value(key, text.strip(), FIELD_TYPES[key])

"""Study files: the shipped ones load and name only registered things; every malformed one is refused by
`python -m rekd.search` in one line (file, key, what is allowed), exit 2, before anything is written."""
import pytest

from rekd.config import FIELD_TYPES
from rekd.errors import UsageError
from rekd.datasets import DATASETS
from rekd.snn.models import ARCHS
from rekd.search.__main__ import main
from rekd.search.study import SEARCH_SPACES, load_study

GOOD = """\
study: t
metric: val_acc
mode: max
fixed: {mode: sparse_kd, dataset: digits, arch: tiny, epochs: 4}
params:
  prune_ratio: {type: uniform, low: 0.0, high: 0.9}
  temperature: {type: loguniform, low: 1.0, high: 20.0}
sampler: {type: tpe, seed: 0}
asha: {grace_period: 1, reduction_factor: 2}
num_samples: 4
max_concurrency: 2
resources: {cpu: 1, gpu: 0.5}
"""
MO = "objectives:\n  - {metric: val_acc, mode: max}\n  - {metric: energy_uj, mode: min}\n"


@pytest.mark.parametrize("name", ["sparse_kd", "default_kd", "baseline", "pareto"])
def test_shipped_studies_load_and_use_only_registered_names(name):
    study = load_study(name)
    assert study.fixed["mode"] == ("sparse_kd" if name == "pareto" else name)
    assert study.fixed["dataset"] in DATASETS and study.fixed["arch"] in ARCHS
    assert all(p.name in FIELD_TYPES for p in study.params)
    assert study.metric == "val_acc" and study.grace_period <= study.epochs
    smoke = study.smoke()
    assert smoke.epochs <= 2 and smoke.num_samples <= 8


def test_the_pareto_study_has_two_objectives_the_first_of_which_is_its_metric():
    study = load_study("pareto")
    assert study.multi_objective and study.objectives == (("val_acc", "max"), ("energy_uj", "min"))
    assert (study.metric, study.mode) == study.objectives[0]
    assert "target_sparsity" in {p.name for p in study.params} and study.fixed["structure"] == "gmp"
    assert not load_study("sparse_kd").multi_objective and load_study("sparse_kd").objectives == (("val_acc", "max"),)


def test_every_study_file_in_search_spaces_is_valid():
    files = sorted(SEARCH_SPACES.glob("*.yaml"))
    assert {f.stem for f in files} >= {"sparse_kd", "default_kd", "baseline"}
    for f in files:
        load_study(str(f))


def replace(text, old, new):
    assert old in text, old
    return text.replace(old, new)


BAD = [
    ("not a mapping", "- 1\n- 2\n", "expected a mapping"),
    ("broken yaml", "study: [t\n", "not valid YAML"),
    ("unknown key", GOOD + "colour: blue\n", "colour: unknown key; allowed: study, description, metric"),
    ("missing params", replace(GOOD, "params:\n  prune_ratio: {type: uniform, low: 0.0, high: 0.9}\n  temperature: {type: loguniform, low: 1.0, high: 20.0}\n", ""), "params: missing"),
    ("low above high", replace(GOOD, "low: 0.0, high: 0.9", "low: 0.8, high: 0.2"), "params.prune_ratio: low=0.8 must be below high=0.2"),
    ("unknown distribution", replace(GOOD, "type: uniform", "type: gaussian"), "params.prune_ratio.type: 'gaussian' is not allowed; allowed: uniform | loguniform | int | categorical"),
    ("bound outside legal range", replace(GOOD, "high: 0.9", "high: 1.0"), "params.prune_ratio.high: prune_ratio=1.0 is not allowed; allowed: 0 <= prune_ratio < 1"),
    ("loguniform at zero", replace(GOOD, "low: 1.0, high: 20.0", "low: 0.0, high: 20.0"), "params.temperature.low: 0.0 is not allowed for loguniform"),
    ("param not a setting", replace(GOOD, "temperature: {", "temprature: {"), "params.temprature: not a setting"),
    ("wrong type of bound", replace(GOOD, "high: 0.9", "high: lots"), "params.prune_ratio.high: 'lots' has the wrong type; allowed: a number"),
    ("wrong type num_samples", replace(GOOD, "num_samples: 4", "num_samples: many"), "num_samples: 'many' has the wrong type"),
    ("num_samples zero", replace(GOOD, "num_samples: 4", "num_samples: 0"), "num_samples: 0 is not allowed; allowed: an integer >= 1"),
    ("unknown fixed setting", replace(GOOD, "epochs: 4}", "epochs: 4, colour: red}"), "fixed: unknown setting 'colour'"),
    ("fixed value out of range", replace(GOOD, "epochs: 4}", "epochs: 0}"), "fixed: epochs=0 is not allowed"),
    ("unknown dataset", replace(GOOD, "dataset: digits", "dataset: mnist"), "unknown dataset 'mnist'"),
    ("unknown sampler", replace(GOOD, "type: tpe", "type: cmaes"), "sampler.type: 'cmaes' is not allowed; allowed: tpe | random | nsga2"),
    ("unknown asha key", replace(GOOD, "reduction_factor: 2", "eta: 2"), "asha.eta: unknown key"),
    ("grace beyond epochs", replace(GOOD, "grace_period: 1", "grace_period: 9"), "asha.grace_period: 9 exceeds epochs=4"),
    ("mode", replace(GOOD, "mode: max", "mode: best"), "mode: 'best' is not allowed; allowed: max | min"),
    ("searched and fixed", replace(GOOD, "epochs: 4}", "epochs: 4, temperature: 2.0}"), "params.temperature: is also in fixed"),
    ("confidence at 1/C", GOOD.replace("sparse_kd", "default_kd").replace("prune_ratio: {type: uniform, low: 0.0, high: 0.9}", "confidence: {type: uniform, low: 0.05, high: 0.99}"), "params.confidence.low: 0.05 is not allowed for digits; allowed: > 1/10"),
    ("int of a float setting", replace(GOOD, "prune_ratio: {type: uniform", "prune_ratio: {type: int"), "params.prune_ratio.type: int does not fit prune_ratio, which is float; allowed: categorical"),
    ("categorical choice illegal", replace(GOOD, "prune_ratio: {type: uniform, low: 0.0, high: 0.9}", "prune_ratio: {type: categorical, choices: [0.1, 1.5]}"), "params.prune_ratio.choices: prune_ratio=1.5 is not allowed"),
    ("resources not a mapping", replace(GOOD, "resources: {cpu: 1, gpu: 0.5}", "resources: 4"), "resources: 4 has the wrong type; allowed: a mapping"),
    ("metric not reported per epoch", replace(GOOD, "metric: val_acc", "metric: test_acc"), "metric: 'test_acc' is not a per-epoch metric; allowed: val_acc"),
    ("unknown objective metric", replace(GOOD, "metric: val_acc\nmode: max\n", MO.replace("energy_uj", "joules")), "objectives[1].metric: 'joules' is not a per-epoch metric; allowed: val_acc, train_acc"),
    ("objective mode not min/max", replace(GOOD, "metric: val_acc\nmode: max\n", MO.replace("mode: min", "mode: lowest")), "objectives[1].mode: 'lowest' is not allowed; allowed: max | min"),
    ("one objective as a list of one", replace(GOOD, "metric: val_acc\nmode: max\n", "objectives:\n  - {metric: val_acc, mode: max}\n"), "objectives: 1 objective(s); allowed: two or more (one objective is written as metric: and mode:)"),
    ("objectives beside metric", replace(GOOD, "mode: max\n", MO), "metric: given with objectives; a study has either metric/mode or objectives"),
    ("objective without mode", replace(GOOD, "metric: val_acc\nmode: max\n", MO.replace(", mode: min", "")), "objectives[1]: needs both metric and mode; allowed: metric, mode"),
    ("objective twice", replace(GOOD, "metric: val_acc\nmode: max\n", MO.replace("energy_uj", "val_acc")), "objectives[1].metric: 'val_acc' is already an objective"),
    ("early_stopping not a bool", GOOD + "early_stopping: sometimes\n", "early_stopping: 'sometimes' has the wrong type; allowed: true or false"),
    ("population without nsga2", replace(GOOD, "type: tpe, seed: 0", "type: tpe, seed: 0, population_size: 8"), "sampler.population_size: only for type: nsga2"),
    ("multivariate random", replace(GOOD, "type: tpe, seed: 0", "type: random, seed: 0, multivariate: true"), "sampler.multivariate: only for type: tpe"),
    ("constant liar not a bool", replace(GOOD, "type: tpe, seed: 0", "type: tpe, seed: 0, constant_liar: maybe"), "sampler.constant_liar: 'maybe' has the wrong type; allowed: true or false"),
]


@pytest.mark.parametrize("text,message", [(t, m) for _, t, m in BAD], ids=[n for n, _, _ in BAD])
def test_a_malformed_study_is_one_line_exit_2_and_nothing_is_written(text, message, tmp_path, capsys):
    path = tmp_path / "study.yaml"
    path.write_text(text)
    storage = tmp_path / "results"
    code = main(["t", "--search-space", str(path), "--storage-path", str(storage)])
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err
    assert not storage.exists()


@pytest.mark.parametrize("argv,message", [
    (["nosuchstudy"], "unknown study 'nosuchstudy'; allowed: baseline, default_kd, pareto, sparse_kd"),
    (["sparse_kd", "--num-samples", "0"], "--num-samples 0 is not allowed; allowed: an integer >= 1"),
    (["sparse_kd", "--epochs", "0"], "epochs=0 is not allowed"),
    (["sparse_kd", "--set", "prune_ratio=2"], "prune_ratio=2.0 is not allowed"),
    (["sparse_kd", "--set", "colour=red"], "--set 'colour=red': expected key=value"),
    (["sparse_kd", "--arch", "resnet50"], "unknown arch 'resnet50'"),
    (["sparse_kd", "--dataset", "cifar100", "--data-root", "/nonexistent"], "cifar100: expected"),
])
def test_bad_flags_are_one_line_exit_2(argv, message, tmp_path, capsys):
    storage = tmp_path / "results"
    code = main(argv + ["--storage-path", str(storage)])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_an_unwritable_storage_path_is_refused(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code = main(["sparse_kd", "--storage-path", str(blocker / "results")])
    err = capsys.readouterr().err
    assert code == 2 and "cannot be written" in err and len(err.strip().splitlines()) == 1, err


def test_set_of_a_searched_setting_fixes_it_and_flags_override_the_file(tmp_path):
    from rekd.search.plan import build_parser, plan_from_args
    args = build_parser().parse_args(["sparse_kd", "--set", "prune_ratio=0.3", "--epochs", "3", "--num-samples", "5",
                                      "--storage-path", str(tmp_path)])
    plan = plan_from_args(args)
    assert "prune_ratio" not in {p.name for p in plan.study.params}
    assert plan.base.prune_ratio == 0.3 and plan.base.epochs == 3 and plan.base.teacher_epochs == 3
    assert plan.study.num_samples == 5


def test_studies_load_and_validate_without_importing_ray():
    import subprocess
    import sys
    code = ("import sys; from rekd.search.study import load_study; "
            "[load_study(n).smoke() for n in ('sparse_kd', 'default_kd', 'baseline', 'pareto')]; "
            "assert not any(m == 'ray' or m.startswith('ray.') for m in sys.modules), 'ray was imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("argv,experiment", [
    (["sparse_kd"], "rekd-sparse_kd"),
    (["sparse_kd", "--smoke-test"], "rekd-sparse_kd-smoke"),
    (["default_kd", "--smoke-test", "--experiment", "mine"], "mine"),
])
def test_smoke_searches_are_tracked_in_an_experiment_of_their_own(argv, experiment, tmp_path, monkeypatch):
    from rekd.search.plan import build_parser, plan_from_args
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    plan = plan_from_args(build_parser().parse_args([*argv, "--storage-path", str(tmp_path)]))
    assert plan.experiment == experiment


def test_reproduce_smoke_runs_are_tracked_apart_in_the_store_searches_in_the_same_folder_use(tmp_path, monkeypatch):
    from rekd.evaluate.reproduce import build_parser, plan_from_args
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    plan = plan_from_args(build_parser().parse_args(["table1", "--smoke-test", "--out", str(tmp_path / "o")]))
    assert plan.experiment == "rekd-reproduce-smoke"
    assert plan.tracking_uri == f"sqlite:///{tmp_path / 'rekd-results' / 'mlflow.db'}"  # the searches' store
    assert plan_from_args(build_parser().parse_args(["table2"])).experiment == "rekd-reproduce"
    assert list(tmp_path.iterdir()) == []  # planning writes nothing


def test_a_command_run_by_an_interpreter_without_rekds_dependencies_says_to_use_the_venv_in_one_line():
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    # -S: no site-packages, so rekd (from the current folder) imports but its dependencies do not
    proc = subprocess.run([sys.executable, "-S", "-m", "rekd.best", "rekd-sparse_kd"], cwd=root,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert "lacks rekd's dependencies (torch" in line and ".venv/bin/python" in line


def test_early_stopping_follows_the_study_unless_a_flag_says_otherwise(tmp_path):
    from rekd.search.plan import make_plan
    assert not load_study("pareto").early_stopping and load_study("sparse_kd").early_stopping
    assert make_plan("pareto", early_stopping="on", storage_path=str(tmp_path)).study.early_stopping
    assert not make_plan("sparse_kd", early_stopping="off", storage_path=str(tmp_path)).study.early_stopping


def test_tpe_options_reach_the_sampler(tmp_path, monkeypatch):
    import warnings

    import optuna

    from rekd.search.optuna_searcher import make_sampler

    path = tmp_path / "study.yaml"
    path.write_text(replace(GOOD, "type: tpe, seed: 0", "type: tpe, seed: 3, multivariate: true, constant_liar: true"))
    study = load_study(str(path))
    assert study.multivariate and study.constant_liar
    made = {}
    real = optuna.samplers.TPESampler
    monkeypatch.setattr(optuna.samplers, "TPESampler", lambda **kw: made.update(kw) or real(**kw))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Optuna's "experimental" warnings are not the user's news
        make_sampler(study)
    assert made == {"seed": 3, "multivariate": True, "constant_liar": True}


def test_kd_reduction_is_searchable_as_a_categorical_setting(tmp_path):
    text = replace(GOOD, "  temperature: {type: loguniform, low: 1.0, high: 20.0}\n",
                   "  temperature: {type: loguniform, low: 1.0, high: 20.0}\n"
                   "  kd_reduction: {type: categorical, choices: [batchmean, elementwise]}\n")
    path = tmp_path / "study.yaml"
    path.write_text(text)
    param = {p.name: p for p in load_study(str(path)).params}["kd_reduction"]
    assert param.kind == "categorical" and param.choices == ("batchmean", "elementwise")
    path.write_text(replace(text, "[batchmean, elementwise]", "[batchmean, sum]"))
    with pytest.raises(UsageError, match="kd_reduction='sum' is not allowed; allowed: batchmean | elementwise"):
        load_study(str(path))


def test_grace_period_flag_overrides_the_study_within_the_budget(tmp_path):
    from rekd.search.plan import make_plan

    plan = make_plan("sparse_kd", epochs=200, grace_period=50, storage_path=str(tmp_path / "r"))
    assert plan.study.grace_period == 50 and plan.base.epochs == 200
    assert make_plan("sparse_kd", epochs=16, storage_path=str(tmp_path / "r")).study.grace_period == 4  # the study's
    with pytest.raises(UsageError, match="--grace-period 17 is not allowed; allowed: an integer 1..16"):
        make_plan("sparse_kd", epochs=16, grace_period=17, storage_path=str(tmp_path / "r"))
    with pytest.raises(UsageError, match="--grace-period 0 is not allowed"):
        make_plan("sparse_kd", grace_period=0, storage_path=str(tmp_path / "r"))

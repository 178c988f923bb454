"""A multi-objective search end to end (`python -m rekd.search pareto --smoke-test`: accuracy against energy):
the parent run holds the Pareto front (CSV and plot), the hypervolume per epochs spent and the counts; the
children carry their outcome and front; MO-ASHA's stopped trials are PRUNED in Optuna; `rekd.best --pareto`
writes the front and `rekd.final` scores it. Interrupted and resumed, the search finishes with one front."""
import csv
import io
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from rekd.search import pareto
from searches import finish, wait_for_an_epoch

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
EXPERIMENT = "rekd-pareto-smoke"
OBJECTIVES = [("val_acc", "max"), ("energy_uj", "min")]


def search_runs(store: Path, name: str):
    client = MlflowClient(f"sqlite:///{store}")
    experiment = client.get_experiment_by_name(EXPERIMENT)
    found = client.search_runs([experiment.experiment_id], filter_string=f"tags.`rekd.search` = '{name}'")
    parent = next(r for r in found if r.data.tags.get("rekd.role") == "search")
    return client, parent, [r for r in found if r.data.tags.get("rekd.role") == "trial"]


def front_rows(client, parent, folder: Path) -> list[dict]:
    path = client.download_artifacts(parent.info.run_id, "summary/pareto_front.csv", dst_path=str(folder))
    return list(csv.DictReader(io.StringIO(Path(path).read_text())))


def check_front(client, parent, children, folder: Path) -> list[dict]:
    """The parent's front is the non-dominated set of the full-budget children, as MLflow holds them."""
    rows = front_rows(client, parent, folder)
    completed = [c for c in children if c.data.tags["rekd.outcome"] == "completed"]
    points = {c.data.tags["rekd.trial_id"]: pareto.minimised([c.data.metrics[m] for m, _ in OBJECTIVES],
                                                            [mode for _, mode in OBJECTIVES]) for c in completed}
    ids = list(points)
    expected = {ids[i] for i in pareto.pareto_front([points[i] for i in ids])}
    assert {r["trial_id"] for r in rows} == expected
    for c in completed:
        assert (c.data.metrics["pareto_front"] == 1) == (c.data.tags["rekd.trial_id"] in expected)
    assert parent.data.metrics["pareto_size"] == len(rows)
    assert parent.data.tags["rekd.pareto_trials"].split(",") == [r["trial_id"] for r in rows]
    curve = client.get_metric_history(parent.info.run_id, "hypervolume")
    steps, values = [m.step for m in curve], [m.value for m in sorted(curve, key=lambda m: m.step)]
    assert steps == sorted(set(steps)) and 0 < values[-1] <= 1
    assert all(later >= earlier - 1e-9 for earlier, later in zip(values, values[1:]))  # a front only grows
    return rows


def test_a_pareto_search_records_its_front_and_feeds_best_and_final(tmp_path, own_tmp):
    store = tmp_path / "r" / "mlflow.db"
    env = {**os.environ, "TMPDIR": str(own_tmp)}
    # the study runs every trial to its budget (the benchmark's verdict); MO-ASHA is switched on here
    proc = subprocess.run([sys.executable, "-m", "rekd.search", "pareto", "--smoke-test", "--early-stopping", "on",
                           "--storage-path", str(tmp_path / "r"), "--name", "front"], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Pareto front (val_acc max, energy_uj min) of the" in proc.stdout
    assert "--pareto --out front.yaml" in proc.stdout.splitlines()[-1]

    client, parent, children = search_runs(store, "front")
    assert parent.data.params["objectives"] == "val_acc:max,energy_uj:min" and parent.data.params["scheduler"] == "mo-asha"
    assert parent.data.tags["rekd.outcome"] == "finished" and "best.alpha" not in parent.data.params
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "summary")}
    assert {"summary/pareto_front.csv", "summary/pareto_front.png", "summary/param_importances_energy_uj.png",
            "summary/optimization_history_val_acc.png"} <= artifacts
    assert len(children) == 6 and all(c.data.tags["rekd.outcome"] in ("completed", "stopped_early") for c in children)
    counts = {o: sum(c.data.tags["rekd.outcome"] == o for c in children) for o in ("completed", "stopped_early")}
    assert parent.data.metrics["trials_completed"] == counts["completed"]
    assert parent.data.metrics["trials_stopped_early"] == counts["stopped_early"] >= 1  # MO-ASHA stopped some
    rows = check_front(client, parent, children, tmp_path)
    assert len(rows) >= 2  # accuracy and energy trade off: more than one point
    values = [pareto.minimised([float(r[m]) for m, _ in OBJECTIVES], ["max", "min"]) for r in rows]
    assert pareto.nondominated_sort(values) == [list(range(len(rows)))]  # mutually non-dominated
    assert {"target_sparsity", "prune_ratio", "temperature", "alpha", "structure"} <= set(rows[0])

    study = optuna.load_study(study_name="front", storage=f"sqlite:///{tmp_path / 'r' / 'front' / 'optuna.db'}")
    states = {t.state for t in study.trials}
    assert states == {optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED}
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    assert len(pruned) == counts["stopped_early"] and all(t.user_attrs["rekd.stopped_values"] for t in pruned)
    assert {t.number for t in study.best_trials} <= {t.number for t in study.trials if t.values}

    # what the search prints next, exactly, from another folder
    command = shlex.split(proc.stdout.splitlines()[-1].removeprefix("next: "))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    best = subprocess.run(command, capture_output=True, text=True, cwd=elsewhere, env=env, timeout=120)
    assert best.returncode == 0, best.stderr
    document = yaml.safe_load((elsewhere / "front.yaml").read_text())
    assert document["pareto"] is True and [c["trial_id"] for c in document["configs"]] == [r["trial_id"] for r in rows]
    assert all(set(c["objectives"]) == {"val_acc", "energy_uj"} for c in document["configs"])
    final = subprocess.run([sys.executable, "-m", "rekd.final", "front.yaml", "--seeds", "2", "--epochs", "1",
                            "--out", "final"], capture_output=True, text=True, cwd=elsewhere, env=env, timeout=600)
    assert final.returncode == 0, final.stderr[-3000:]
    assert "non-dominated" in final.stdout and "energy" in final.stdout
    assert list(own_tmp.iterdir()) == []


def test_an_interrupted_pareto_search_resumes_to_one_front(tmp_path, own_tmp):
    env = {**os.environ, "TMPDIR": str(own_tmp)}
    proc = subprocess.Popen([sys.executable, "-m", "rekd.search", "pareto", "--smoke-test", "--num-samples", "4",
                             "--epochs", "6", "--storage-path", str(tmp_path / "r"), "--name", "ctrl-c"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env,
                            start_new_session=True)
    wait_for_an_epoch(proc, tmp_path, "ctrl-c", experiment=EXPERIMENT)
    os.killpg(proc.pid, signal.SIGINT)
    code, out, err = finish(proc, timeout=120)
    assert code == 130, err[-3000:]
    command = err.strip().splitlines()[-1]
    resumed = subprocess.run(shlex.split(command), capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "Pareto front (val_acc max, energy_uj min)" in resumed.stdout
    client, parent, children = search_runs(tmp_path / "r" / "mlflow.db", "ctrl-c")
    assert parent.data.tags["rekd.outcome"] == "finished" and parent.data.tags["rekd.resumed"] == "true"
    assert parent.data.params["scheduler"] == "none"  # the study's default: every trial runs its budget
    finished = [c for c in children if c.info.status == "FINISHED"]
    assert len(finished) == 4 and all(c.data.tags["rekd.outcome"] == "completed" for c in finished)
    check_front(client, parent, finished, tmp_path)
    study = optuna.load_study(study_name="ctrl-c", storage=f"sqlite:///{tmp_path / 'r' / 'ctrl-c' / 'optuna.db'}")
    done = [t for t in study.trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]
    assert len(done) == 4 and optuna.trial.TrialState.RUNNING not in {t.state for t in study.trials}
    assert all(len(t.values) == 2 for t in done)
    assert list(own_tmp.iterdir()) == []

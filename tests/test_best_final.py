"""rekd.evaluate.best and rekd.evaluate.final refuse bad input in one line with exit status 2, leaving nothing behind."""
import pytest

from rekd.evaluate.best import main as best_main
from rekd.evaluate.final import main as final_main


def run(main, argv, capsys):
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def test_best_refuses_a_missing_sqlite_store_without_creating_it(tmp_path, capsys):
    store = tmp_path / "nothing.db"
    code, err = run(best_main, ["rekd-sparse_kd", "--tracking-uri", f"sqlite:///{store}", "--out", str(tmp_path / "b.yaml")], capsys)
    assert code == 2 and "no MLflow store at" in err and len(err.strip().splitlines()) == 1
    assert not store.exists() and not (tmp_path / "b.yaml").exists()


def test_best_names_the_experiments_there_are(tmp_path, capsys):
    from mlflow.tracking import MlflowClient
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    MlflowClient(uri).create_experiment("rekd-sparse_kd")
    code, err = run(best_main, ["rekd-nope", "--tracking-uri", uri, "--out", str(tmp_path / "b.yaml")], capsys)
    assert code == 2 and "unknown experiment 'rekd-nope'" in err and "rekd-sparse_kd" in err
    code, err = run(best_main, ["rekd-sparse_kd", "--tracking-uri", uri, "--out", str(tmp_path / "b.yaml")], capsys)
    assert code == 2 and "no search in this experiment" in err
    code, err = run(best_main, ["rekd-sparse_kd", "--top", "0", "--tracking-uri", uri], capsys)
    assert code == 2 and "--top 0 is not allowed" in err
    assert not (tmp_path / "b.yaml").exists()


@pytest.mark.parametrize("content,message", [
    ("- 1\n", "expected a mapping"),
    ("configs: []\n", "configs: expected a non-empty list"),
    ("configs: [3]\n", "configs[0]: expected a mapping with 'settings'"),
    ("configs:\n- settings: {mode: sparse_kd, prune_ratio: 4.0}\n", "prune_ratio=4.0 is not allowed"),
    ("configs:\n- settings: {mode: sparse_kd, arch: alexnet}\n", "unknown arch 'alexnet'"),
])
def test_final_refuses_a_malformed_best_file(content, message, tmp_path, capsys):
    path = tmp_path / "best.yaml"
    path.write_text(content)
    code, err = run(final_main, [str(path), "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}",
                                 "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "m.db").exists()


def test_final_refuses_zero_seeds(tmp_path, capsys):
    code, err = run(final_main, [str(tmp_path / "x.yaml"), "--seeds", "0"], capsys)
    assert code == 2 and "--seeds 0 is not allowed" in err

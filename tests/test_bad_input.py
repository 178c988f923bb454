"""One table of malformed inputs across rekd.train.loop, rekd.search.plan, rekd.evaluate.best and rekd.evaluate.final: each gives one
line that says what is wrong and what is allowed, exit status 2, no traceback, and leaves nothing behind
(no new file in the working folders, no new run in MLflow)."""
import shutil
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from rekd.evaluate.best import main as best_main
from rekd.config import TrainConfig
from rekd.evaluate.final import main as final_main
from rekd.search.__main__ import main as search_main
from rekd.train.loop import train
from rekd.train.__main__ import main as train_main
from processes import free_port
from usage import assert_usage_error

MAINS = {"train": train_main, "search": search_main, "best": best_main, "final": final_main}
GOOD_STUDY = Path(__file__).resolve().parent.parent / "search_spaces" / "sparse_kd.yaml"


closed_port = free_port  # nothing listens there once the socket is closed


CASES = [
    # rekd.train.loop
    ("train", ["distill"], "invalid choice: 'distill'"),
    ("train", ["sparse_kd", "--set", "prune_ratio=1"], "prune_ratio=1.0 is not allowed; allowed: 0 <= prune_ratio < 1"),
    ("train", ["default_kd", "--set", "confidence=0.05"], "allowed: 1/10 < confidence < 1"),
    ("train", ["baseline", "--epochs", "0"], "epochs=0 is not allowed; allowed: an integer >= 1"),
    ("train", ["baseline", "--set", "batch_size=big"], "batch_size='big' has the wrong type; allowed: an integer"),
    ("train", ["baseline", "--config", "{tmp}/list.yaml"], "expected a mapping of key: value settings, got list"),
    ("train", ["baseline", "--dataset", "cifar100", "--data-root", "{tmp}/empty"], "cifar100: expected"),
    ("train", ["baseline", "--dataset", "dvsgesture", "--data-root", "{tmp}/dvs-partial"], "at least 100 files, found 90"),
    ("train", ["sparse_kd", "--set", "structure=gmp", "--set", "target_sparsity=1"],
     "target_sparsity=1.0 is not allowed; allowed: 0 <= target_sparsity < 1"),
    ("train", ["sparse_kd", "--set", "structure=gmp", "--set", "target_sparsity=-0.1"],
     "target_sparsity=-0.1 is not allowed; allowed: 0 <= target_sparsity < 1"),
    ("train", ["sparse_kd", "--set", "structure=pruned"], "structure='pruned' is not allowed; allowed: dense | gmp | rewire"),
    ("train", ["sparse_kd", "--set", "structure=gmp", "--set", "target_sparsity=0.8", "--set", "sparsity_start_epoch=4",
               "--set", "sparsity_end_epoch=2"], "sparsity_end_epoch=2 is not allowed; allowed: after sparsity_start_epoch=4"),
    ("train", ["baseline", "--set", "target_sparsity=0.8"], "target_sparsity=0.8 needs structure=gmp or structure=rewire"),
    ("train", ["default_kd", "--set", "generations=2"], "generations=2 needs mode=sparse_kd"),
    ("train", ["--resume", "{tmp}/corrupt"], "is corrupt or not a torch file"),
    ("train", ["--resume", "{tmp}/pickled"], "holds pickled Python objects, which rekd refuses to load"),
    ("train", ["--resume", "{tmp}/other-arch"], "does not fit this network"),
    # rekd.search.plan
    ("search", ["x", "--search-space", "{tmp}/broken.yaml"], "not valid YAML"),
    ("search", ["x", "--search-space", "{tmp}/list.yaml"], "expected a mapping"),
    ("search", ["x", "--search-space", "{tmp}/unknown-key.yaml"], "colour: unknown key"),
    ("search", ["x", "--search-space", "{tmp}/low-high.yaml"], "params.prune_ratio: low=0.8 must be below high=0.2"),
    ("search", ["x", "--search-space", "{tmp}/wrong-type.yaml"], "num_samples: 'many' has the wrong type"),
    ("search", ["x", "--search-space", "{tmp}/out-of-range.yaml"], "prune_ratio=1.5 is not allowed"),
    ("search", ["sparse_kd", "--num-samples", "0"], "--num-samples 0 is not allowed; allowed: an integer >= 1"),
    ("search", ["nosuchstudy"], "unknown study 'nosuchstudy'"),
    ("search", ["sparse_kd", "--storage-path", "{tmp}/a-file/results"], "cannot be written"),
    ("search", ["sparse_kd", "--tracking-uri", "http://127.0.0.1:{closed}"], "cannot be used"),
    # rekd.evaluate.best
    ("best", ["rekd-nope", "--tracking-uri", "sqlite:///{tmp}/store/mlflow.db"], "unknown experiment 'rekd-nope'"),
    ("best", ["rekd-sparse_kd", "--tracking-uri", "sqlite:///{tmp}/missing.db"], "no MLflow store at"),
    ("best", ["rekd-sparse_kd", "--top", "0", "--tracking-uri", "sqlite:///{tmp}/store/mlflow.db"], "--top 0 is not allowed"),
    ("best", ["rekd-sparse_kd", "--tracking-uri", "http://127.0.0.1:{closed}"], "cannot be read"),
    # rekd.evaluate.final
    ("final", ["{tmp}/list.yaml"], "expected a mapping"),
    ("final", ["{tmp}/no-configs.yaml"], "configs: expected a non-empty list"),
    ("final", ["{tmp}/bad-setting.yaml"], "alpha=3.0 is not allowed; allowed: 0 <= alpha <= 1"),
    ("final", ["{tmp}/nothing.yaml"], "cannot be read"),
    ("final", ["{tmp}/no-configs.yaml", "--seeds", "0"], "--seeds 0 is not allowed"),
]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, dvs_root, cache_dir):
    tmp = tmp_path_factory.mktemp("bad-input")
    study = GOOD_STUDY.read_text()
    files = {
        "list.yaml": "- 1\n- 2\n",
        "broken.yaml": "study: [x\n",
        "unknown-key.yaml": study + "colour: blue\n",
        "low-high.yaml": study.replace("prune_ratio: {type: uniform, low: 0.0, high: 0.9}",
                                       "prune_ratio: {type: uniform, low: 0.8, high: 0.2}"),
        "wrong-type.yaml": study.replace("num_samples: 16", "num_samples: many"),
        "out-of-range.yaml": study.replace("high: 0.9", "high: 1.5"),
        "no-configs.yaml": "configs: []\n",
        "bad-setting.yaml": "configs:\n- settings: {mode: sparse_kd, alpha: 3.0}\n",
    }
    for name, text in files.items():
        (tmp / name).write_text(text)
    (tmp / "empty").mkdir()
    (tmp / "a-file").write_text("")
    shutil.copytree(dvs_root, tmp / "dvs-partial")
    for f in sorted((tmp / "dvs-partial" / "DVSGesture" / "ibmGestureTest").rglob("*.npy"))[:20]:
        f.unlink()
    (tmp / "corrupt").mkdir()
    (tmp / "corrupt" / "last.pt").write_bytes(b"\x00not a checkpoint")
    (tmp / "pickled").mkdir()
    torch.save({"format": "rekd-checkpoint-1", "payload": Payload()}, tmp / "pickled" / "last.pt")
    train(TrainConfig(epochs=1, cache_dir=cache_dir), run_dir=tmp / "other-arch")
    state = torch.load(tmp / "other-arch" / "last.pt", weights_only=True)
    state["config"]["arch"] = "vgg16"  # a checkpoint that says vgg16 but holds the tiny network
    torch.save(state, tmp / "other-arch" / "last.pt")
    (tmp / "store").mkdir()
    MlflowClient(f"sqlite:///{tmp / 'store' / 'mlflow.db'}").create_experiment("rekd-sparse_kd")
    return tmp


class Payload:
    def __reduce__(self):
        import os
        return (os.system, ("echo unpickled",))


def snapshot(tmp: Path) -> dict:
    return {str(p.relative_to(tmp)): p.stat().st_mtime_ns for p in tmp.rglob("*")
            if "store" not in p.parts}


@pytest.mark.parametrize("command,argv,message", CASES, ids=[f"{c}-{i}" for i, (c, _, _) in enumerate(CASES)])
def test_malformed_input_is_one_line_exit_2_and_leaves_nothing(command, argv, message, workspace, tmp_path, capsys):
    assert len(CASES) >= 25
    closed = closed_port()
    argv = [a.replace("{tmp}", str(workspace)).replace("{closed}", str(closed)) for a in argv]
    if command == "train":
        argv += ["--out", str(tmp_path / "run")] if "--resume" not in argv else []
    if command == "search" and "--storage-path" not in argv:
        argv += ["--storage-path", str(tmp_path / "results")]
    if command == "final":
        argv += ["--tracking-uri", f"sqlite:///{workspace / 'store' / 'mlflow.db'}", "--out", str(tmp_path / "final")]
    before = snapshot(workspace)
    store = MlflowClient(f"sqlite:///{workspace / 'store' / 'mlflow.db'}")
    runs_before = len(store.search_runs([e.experiment_id for e in store.search_experiments()]))
    try:
        code = MAINS[command](argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    out, err = capsys.readouterr()
    assert_usage_error(code, out, err, message)
    assert snapshot(workspace) == before
    assert list(tmp_path.iterdir()) == []  # no run folder, results folder or table
    assert len(store.search_runs([e.experiment_id for e in store.search_experiments()])) == runs_before

"""`python -m rekd.train`: a good run writes its folder; every bad input is one line, exit 2, nothing written."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rekd.train.__main__ import main
from usage import run_command

ROOT = Path(__file__).resolve().parent.parent


def run_main(argv, capsys):
    return run_command(main, argv, capsys)


BAD_INPUTS = [
    (["distill"], "invalid choice: 'distill'"),
    ([], "a mode is required; allowed: baseline | sparse_kd | default_kd"),
    (["baseline", "--dataset", "mnist"], "unknown dataset 'mnist'; allowed: cifar100, digits, dvsgesture, ndigits"),
    (["baseline", "--arch", "resnet50"], "unknown arch 'resnet50'; allowed: resnet18, tiny, vgg16, wrn16_4"),
    (["baseline", "--set", "foo=1"], "unknown setting 'foo'"),
    (["baseline", "--set", "epochs"], "expected key=value"),
    (["sparse_kd", "--set", "prune_ratio=1.0"], "prune_ratio=1.0 is not allowed; allowed: 0 <= prune_ratio < 1"),
    (["sparse_kd", "--set", "temperature=0"], "temperature=0.0 is not allowed; allowed: a number > 0"),
    (["sparse_kd", "--set", "temperature=-2"], "temperature=-2.0 is not allowed"),
    (["default_kd", "--set", "alpha=1.5"], "alpha=1.5 is not allowed; allowed: 0 <= alpha <= 1"),
    (["default_kd", "--set", "confidence=0.05"], "confidence=0.05 is not allowed for digits; allowed: 1/10 < confidence < 1"),
    (["default_kd", "--set", "confidence=1"], "confidence=1.0 is not allowed"),
    (["baseline", "--epochs", "0"], "epochs=0 is not allowed; allowed: an integer >= 1"),
    (["baseline", "--epochs", "two"], "argument --epochs: invalid int value: 'two'"),
    (["baseline", "--set", "epochs=2.5"], "epochs='2.5' has the wrong type; allowed: an integer"),
    (["baseline", "--set", "amp=maybe"], "amp='maybe' has the wrong type; allowed: true or false"),
    (["baseline", "--dataset", "cifar100", "--data-root", "{tmp}/nothing"], "cifar100: expected"),
    (["baseline", "--dataset", "dvsgesture", "--data-root", "{tmp}/nothing"], "dvsgesture: expected"),
    (["baseline", "--config", "{tmp}/list.yaml"], "expected a mapping of key: value settings, got list"),
    (["baseline", "--config", "{tmp}/broken.yaml"], "not valid YAML"),
    (["baseline", "--config", "{tmp}/unknown.yaml"], "unknown setting 'learning_rate'"),
    (["baseline", "--resume", "{tmp}/nowhere"], "does not exist"),
    (["baseline", "--resume", "{tmp}/corrupt"], "is corrupt or not a torch file"),
]
if not torch.cuda.is_available():
    BAD_INPUTS.append((["baseline", "--device", "cuda"], "no CUDA device is available"))


@pytest.mark.parametrize("argv,message", BAD_INPUTS, ids=[" ".join(a) or "no-mode" for a, _ in BAD_INPUTS])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(argv, message, tmp_path, capsys):
    (tmp_path / "list.yaml").write_text("- epochs: 2\n")
    (tmp_path / "broken.yaml").write_text("epochs: [2\n")
    (tmp_path / "unknown.yaml").write_text("learning_rate: 0.1\n")
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "last.pt").write_bytes(b"\x00garbage")
    before = sorted(p.name for p in tmp_path.iterdir())
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    code, out, err = run_main(argv + ["--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache")], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in err and out == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no run folder, no cache


def test_a_bad_value_from_the_shell_gives_one_line_and_status_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "rekd.train", "sparse_kd", "--set", "prune_ratio=2",
                           "--out", str(tmp_path / "run")], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("python -m rekd.train: error: prune_ratio=2.0 is not allowed; "
                                   "allowed: 0 <= prune_ratio < 1")
    assert not (tmp_path / "run").exists()


def test_a_run_writes_its_folder_resumes_and_becomes_the_teacher_of_sparse_kd(tmp_path):
    env = {**os.environ, "REKD_CACHE_DIR": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "rekd.train", "baseline", "--epochs", "2", "--out", str(tmp_path / "run")]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "epoch 2/2 " in proc.stdout and "val_acc=" in proc.stdout and "done: val_acc=" in proc.stdout
    run = tmp_path / "run"
    config = json.loads((run / "config.json").read_text())
    assert config["timesteps"] == 4 and config["seed"] == 0 and config["lr"] == 0.1  # resolved
    info = json.loads((run / "provenance.json").read_text())
    assert info["code_version"] and info["version/torch"].startswith("2.")
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
    resumed = subprocess.run([sys.executable, "-m", "rekd.train", "--resume", str(run)], capture_output=True,
                             text=True, cwd=ROOT, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "epoch 1/" not in resumed.stdout and "done: val_acc=" in resumed.stdout  # nothing left to train
    assert "cached as the sparse_kd teacher" in proc.stdout
    distil = subprocess.run([sys.executable, "-m", "rekd.train", "sparse_kd", "--epochs", "2", "--set", "prune_ratio=0.5",
                             "--out", str(tmp_path / "kd")], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert distil.returncode == 0, distil.stderr
    assert "training the baseline" not in distil.stderr and "teacher_val_acc=" in distil.stdout


@pytest.mark.parametrize("mode, where", [("baseline", "train"), ("sparse_kd", "ensure_teacher")])
def test_a_batch_too_large_for_the_gpu_is_one_line_that_says_what_to_lower(tmp_path, capsys, monkeypatch, mode, where):
    import rekd.train.__main__

    def out_of_memory(*args, **kwargs):  # what torch raises when the card is full (no card here)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.1 GiB total)\n"
                                     "See documentation for Memory Management")

    # sparse_kd without a cached teacher trains it first: that can be what does not fit
    monkeypatch.setattr(rekd.train.__main__, where, out_of_memory)
    code, out, err = run_main([mode, "--set", "batch_size=200000", "--out", str(tmp_path / "run"),
                               "--cache-dir", str(tmp_path / "cache")], capsys)
    assert code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "batch_size=200000" in lines[0] and "does not fit the GPU: CUDA out of memory" in lines[0]
    assert "lower batch_size (--set batch_size=N)" in lines[0]


# -- every entry point's edge: Ctrl-C and SIGTERM ------------------------------------------------------------
SIGNAL_INSIDE_C_RUN_CODE = '''
import ctypes, sys
from rekd.cli import run

def main(argv):
    run_string = ctypes.pythonapi.PyRun_String
    run_string.restype = ctypes.py_object
    run_string.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.py_object, ctypes.py_object]
    # Python code that a C extension runs, as torch's may: the signal lands inside it.
    run_string(b"import os, signal\\nos.kill(os.getpid(), signal.{name})\\nwhile True: pass\\n", 257, {{}}, {{}})
    return 0

sys.exit(run(main, "probe"))
'''


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_inside_code_a_c_extension_runs_still_gives_the_signals_status_and_one_line(signum, tmp_path):
    """A bare KeyboardInterrupt through such code makes CPython end `python -m` by SIGINT (-2) whatever status
    the command returns; rekd's handlers raise their own subclass, so the command's status stands."""
    (tmp_path / "signal_probe.py").write_text(SIGNAL_INSIDE_C_RUN_CODE.format(name=signum.name))
    proc = subprocess.run([sys.executable, "-m", "signal_probe"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 128 + signum, proc.stderr[-2000:]
    assert proc.stderr.strip() == f"probe: interrupted ({signum.name})"

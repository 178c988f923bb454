"""Trials and checkpoints on an object store every Ray node reaches: a real S3 API (moto's server) on
127.0.0.1; the driver's own files stay in --local-path. A search interrupted mid-trial resumes its trials
from the checkpoints read back from S3."""
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import boto3
import pytest

from rekd.search import trial_storage
from searches import finish, runs, start_search, wait_for_an_epoch

ROOT = Path(__file__).resolve().parent.parent
BUCKET = "rekd-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 server on 127.0.0.1, in its own session, ended by its PID; its endpoint and keys as the AWS
    variables every process of the test reads (pyarrow, as Ray uses it, and boto3)."""
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "rekd-test",
           "AWS_SECRET_ACCESS_KEY": "rekd-test", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(env["AWS_ENDPOINT_URL"], timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"moto_server did not start: {log.read_text()[-2000:]}")
                time.sleep(0.3)
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        yield boto3.client("s3")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def keys(client, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def test_uris_and_folders_are_told_apart_and_joined():
    assert trial_storage.is_uri("s3://b/p") and trial_storage.is_uri("gs://b") and not trial_storage.is_uri("/x/y")
    assert not trial_storage.is_uri("rekd-results") and not trial_storage.is_uri("C:/x")
    assert trial_storage.resolve("s3://b/p/") == "s3://b/p"
    assert trial_storage.resolve("rel") == str(Path("rel").resolve())
    assert trial_storage.join("s3://b/p", "name") == "s3://b/p/name"
    assert trial_storage.join("s3://b/p?region=eu-west-1", "n") == "s3://b/p/n?region=eu-west-1"
    assert trial_storage.join("/a/b/", "n", "t") == "/a/b/n/t"


def test_a_restored_trial_whose_named_checkpoint_is_gone_continues_from_its_newest_later_one(tmp_path):
    fs, _ = trial_storage.filesystem(str(tmp_path))
    trial = tmp_path / "trial_1"
    for name, with_file in (("checkpoint_000001", True), ("checkpoint_000004", True),
                            ("checkpoint_000005", False), ("checkpoint_000003", True)):
        (trial / name).mkdir(parents=True)
        if with_file:
            (trial / name / "last.pt").write_bytes(b"x")
    (trial / "result.json").write_text("{}")
    named = str(trial / "checkpoint_000001")
    assert trial_storage.checkpoint_candidates(named, fs, "last.pt") == [named]  # there: only it
    gone = str(trial / "checkpoint_000002")  # deleted by Tune, its successors on disk; an empty one skipped
    assert trial_storage.checkpoint_candidates(gone, fs, "last.pt") == [
        str(trial / "checkpoint_000004"), str(trial / "checkpoint_000003")]
    assert trial_storage.checkpoint_candidates(str(trial / "checkpoint_000006"), fs, "last.pt") == []
    assert trial_storage.checkpoint_candidates(str(tmp_path / "nowhere" / "checkpoint_000001"), fs, "last.pt") == []


def test_checkpoint_candidates_read_an_object_store(s3):
    for key in ("cands/trial_1/checkpoint_000002/last.pt", "cands/trial_1/checkpoint_000003/last.pt"):
        s3.put_object(Bucket=BUCKET, Key=key, Body=b"x")
    fs, path = trial_storage.filesystem(f"s3://{BUCKET}/cands/trial_1")
    assert trial_storage.checkpoint_candidates(f"{path}/checkpoint_000001", fs, "last.pt") == [
        f"{path}/checkpoint_000003", f"{path}/checkpoint_000002"]
    assert trial_storage.checkpoint_candidates(f"{path}/checkpoint_000002", fs, "last.pt") == [
        f"{path}/checkpoint_000002"]


def test_an_unreachable_bucket_is_refused_in_one_line_before_anything_is_written(s3, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "rekd.search", "baseline", "--smoke-test",
                           "--storage-path", "s3://no-such-bucket/x", "--local-path", str(tmp_path / "local")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--storage-path s3://no-such-bucket/x cannot be written" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_an_interrupted_search_resumes_its_trials_from_checkpoints_read_back_from_s3(s3, tmp_path, own_tmp):
    storage = f"s3://{BUCKET}/searches"
    proc, env = start_search(tmp_path, own_tmp, "on-s3", "--storage-path", storage,
                             "--local-path", str(tmp_path / "r"))
    wait_for_an_epoch(proc, tmp_path, "on-s3")
    os.killpg(proc.pid, signal.SIGINT)
    code, out, err = finish(proc, timeout=120)
    assert code == 130, err[-3000:]
    assert f"trials and checkpoints: {storage}/on-s3" in out
    command = err.strip().splitlines()[-1]
    assert f"--storage-path {storage}" in command and f"--local-path {tmp_path / 'r'}" in command
    checkpoints = [k for k in keys(s3, "searches/on-s3/") if k.endswith("/last.pt")]
    assert checkpoints, "the interrupted trials' checkpoints are in S3"
    # Tune's trials live in S3 only: the local folder holds the driver's files, no trial folders
    assert not list((tmp_path / "r" / "on-s3").glob("trial_*"))

    resumed = subprocess.run(shlex.split(command), capture_output=True, text=True, cwd=tmp_path, env=env,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    client, parent, children = runs(tmp_path, "on-s3")
    assert parent.info.status == "FINISHED"
    assert len(children) == 4 and all(c.info.status == "FINISHED" for c in children)
    continued = [c for c in children if "rekd.restored_from" in c.data.tags]
    assert continued, "some trial was continued from a checkpoint"
    for child in continued:
        source = child.data.tags["rekd.restored_from"]
        assert source.startswith(f"{storage}/on-s3/trial_") and source.endswith("/last.pt"), source
        steps = sorted({m.step for m in client.get_metric_history(child.info.run_id, "val_acc")})
        assert steps == list(range(1, steps[-1] + 1))  # it went on from its checkpoint: no gap
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"] and list(own_tmp.iterdir()) == []

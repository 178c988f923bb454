"""torch.compile in the training path: every architecture's step traces as one graph, compiled runs keep
their weights' names (checkpoints and the teacher cache load either way) and resume exactly, and the
`compile` and `amp` settings resolve to what runs on the device."""
import getpass
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
import torch._dynamo

from rekd.config import TrainConfig
from rekd.errors import UsageError
from rekd.snn.models import ARCHS, build_model, freeze_for_inference
from rekd.storage import load_tensors
from rekd.snn.teachers import teacher_key
from rekd.train.optim import for_device
from rekd.train.loop import train

SHAPES = {"tiny": (1, 8, 10), "resnet18": (3, 32, 100), "wrn16_4": (3, 32, 100), "vgg16": (3, 32, 100)}


def graphs(body: torch.nn.Module, x: torch.Tensor) -> tuple[int, int, list[str]]:
    torch._dynamo.reset()
    explained = torch._dynamo.explain(body)(x)
    return explained.graph_count, explained.graph_break_count, [b.reason for b in explained.break_reasons]


@pytest.mark.parametrize("arch", list(ARCHS))
def test_the_body_of_every_architecture_compiles_as_one_graph_for_training_and_for_the_frozen_teacher(arch):
    """SpikingNet.compiled compiles the body alone (reset_net stays eager, by design): spikingjelly's
    multi-step IF op, the surrogate's autograd function and the frozen teacher's IF loop all trace, so a
    step is one graph with no breaks. A break would split the step and fall back to Python between pieces."""
    channels, size, classes = SHAPES[arch]
    model = build_model(TrainConfig(arch=arch).resolved(4), channels, classes, size).train()
    x = torch.rand(4, 2, channels, size, size)
    count, breaks, reasons = graphs(model.body, x)
    assert (count, breaks) == (1, 0), reasons
    frozen = freeze_for_inference(build_model(TrainConfig(arch=arch).resolved(4), channels, classes, size))
    with torch.inference_mode():
        count, breaks, reasons = graphs(frozen.body, x)
    assert (count, breaks) == (1, 0), reasons


@pytest.mark.parametrize("neuron", [dict(surrogate="sigmoid"), dict(v_reset=None), dict(detach_reset=True)])
def test_every_neuron_setting_compiles_forward_and_backward_in_one_graph(neuron):
    cfg = TrainConfig(**neuron).resolved(4)
    model = build_model(cfg, 1, 10, 8).train()
    torch._dynamo.reset()
    body = torch.compile(model.body, fullgraph=True, backend="aot_eager")  # fullgraph: a break raises
    x = torch.rand(4, 3, 1, 8, 8)
    logits = model.readout(body, x)
    logits.sum().backward()
    eager = build_model(cfg, 1, 10, 8).train()
    eager.load_state_dict(model.state_dict())
    torch.testing.assert_close(logits, eager(x))


@pytest.mark.slow
def test_a_compiled_run_checkpoints_plain_weight_names_resumes_exactly_and_reports_its_compile_time(cache_dir,
                                                                                                     tmp_path):
    cfg = TrainConfig(cache_dir=cache_dir, epochs=2, device="cpu", compile="true")

    def crash_after_epoch_1(metrics):
        if metrics["epoch"] == 1:
            raise KeyboardInterrupt

    reports = []
    straight = train(cfg, run_dir=tmp_path / "straight", on_epoch=reports.append)
    assert straight.config.compile == "true"
    assert reports[0]["compile_time_s"] > 0 and "compile_time_s" not in reports[1]  # once per process
    saved = load_tensors(tmp_path / "straight" / "last.pt", "checkpoint")["model"]
    assert not [k for k in saved if "_orig_mod" in k]
    assert list(saved) == list(build_model(cfg.resolved(4), 1, 10, 8).state_dict())

    with pytest.raises(KeyboardInterrupt):
        train(cfg, run_dir=tmp_path / "resumed", on_epoch=crash_after_epoch_1)
    shutil.copytree(tmp_path / "resumed", tmp_path / "eager")
    resumed = train(cfg, run_dir=tmp_path / "resumed")
    for a, b in zip(resumed.model.state_dict().values(), straight.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # The same checkpoint continued in eager mode: it loads as it is and the run finishes
    eager = train(TrainConfig(**{**cfg.to_dict(), "compile": "false"}), run_dir=tmp_path / "eager")
    assert [m["epoch"] for m in eager.history] == [1, 2] and eager.config.compile == "false"
    # Compiled kernels go to TORCHINDUCTOR_CACHE_DIR (rekd points it at its cache), but torch 2.14 writes a
    # few of its own caches (precompiled headers, key-value caches) to <temp>/torchinductor_<user> whatever
    # that says: torch's doing, removed here so that the session's temp-folder check still finds rekd's.
    shutil.rmtree(Path(tempfile.gettempdir()) / f"torchinductor_{getpass.getuser()}", ignore_errors=True)


def test_compile_and_amp_resolve_to_what_runs_on_the_device():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert (for_device(TrainConfig(), cpu).compile, for_device(TrainConfig(), cpu).amp) == ("false", False)
    big = TrainConfig(arch="resnet18")  # on CPUs, where the bench shows compiling pays: not for tiny
    assert (for_device(big, cpu).compile, for_device(big, cpu).amp) == ("true", False)
    assert (for_device(TrainConfig(), cuda).compile, for_device(TrainConfig(), cuda).amp) == ("true", True)
    # Eager on a GPU: fp32, where bf16 autocast measured slower; asked for, bf16 all the same
    assert for_device(TrainConfig(compile="false"), cuda).amp is False
    assert for_device(TrainConfig(compile="false", amp=True), cuda).amp is True
    assert for_device(TrainConfig(amp=False), cuda).amp is False
    assert for_device(TrainConfig(compile="true", amp=True), cpu) == TrainConfig(compile="true", amp=False)
    assert TrainConfig.from_dict({"compile": True}).compile == "true"  # YAML's booleans
    assert TrainConfig().with_overrides(["compile=false"]).compile == "false"
    with pytest.raises(UsageError, match=r"compile='yes' is not allowed; allowed: auto \| true \| false"):
        TrainConfig().with_overrides(["compile=yes"])
    # Neither changes which teacher a run distils from
    assert teacher_key(TrainConfig(compile="true", amp=True)) == teacher_key(TrainConfig())

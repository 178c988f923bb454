"""rekd.export: a run's student as a dense or sparse weights file that reads back exactly, and loads into its network."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rekd.config import TrainConfig
from rekd.datasets import dataset_spec
from rekd.errors import UsageError
from rekd.snn.models import build_model
from rekd.storage import save_atomic
from rekd.train.checkpoint import FILENAME, load_checkpoint
from rekd.train.export import DENSE_FORMAT, SPARSE_FORMAT, _main, load_export, main
from rekd.train.loop import train
from usage import assert_usage_error

ROOT = Path(__file__).resolve().parent.parent
# The tiny network's input on digits (8x8 grey images): what build_model needs besides the config.
DIGITS_INPUT = {"in_channels": 1, "resolution": 8}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_dir) -> Path:
    """The checkpoint of a one-epoch tiny network on digits, trained once for this file."""
    run_dir = tmp_path_factory.mktemp("run")
    train(TrainConfig(cache_dir=cache_dir, epochs=1, eval_test=True), run_dir=run_dir)
    return run_dir / FILENAME


def conv_keys(weights):
    return [key for key, value in weights.items() if value.dim() == 4]


def half_masks(weights, seed=0):
    """Exactly half of every conv weight live, at random places; masks shaped (and laid out) like the weight."""
    generator = torch.Generator().manual_seed(seed)
    masks = {}
    for key in conv_keys(weights):
        weight = weights[key]
        flat = torch.zeros(weight.numel(), dtype=torch.bool)
        flat[torch.randperm(weight.numel(), generator=generator)[: weight.numel() // 2]] = True
        masks[key] = torch.empty_like(weight, dtype=torch.bool).copy_(flat.view(weight.shape))  # keeps NHWC
    return masks


def sparse_run(trained: Path, folder: Path, *, with_masks: bool, share: float = 0.5) -> tuple[Path, dict]:
    """A copy of the trained run as a sparse student: pruned weights zeroed, with or without its masks.

    The checkpoint's conv weights are channels_last (the training default), so the flat indices are
    checked against the logical row-major order, not the memory order.
    """
    state = load_checkpoint(trained)
    weights = state["model"]
    masks = half_masks(weights) if share == 0.5 else {}
    for key in conv_keys(weights):
        if key not in masks:
            generator = torch.Generator().manual_seed(1)
            flat = torch.rand(weights[key].numel(), generator=generator) >= share
            masks[key] = torch.empty_like(weights[key], dtype=torch.bool).copy_(flat.view(weights[key].shape))
        # Multiplying by the mask, as training does, leaves -0.0 where a negative weight was pruned.
        weights[key] = (weights[key] * masks[key]).contiguous(memory_format=torch.channels_last)
    if with_masks:
        state["structure"] = {"masks": {key.removesuffix(".weight"): mask for key, mask in masks.items()}}
    save_atomic(state, folder / FILENAME)
    return folder, masks


def export(run, out, *fmt):
    assert main([str(run), "--out", str(out), *fmt]) == 0
    return out


def test_dense_export_holds_exactly_the_masked_weights_and_says_what_it_is(trained, tmp_path, capsys):
    state = load_checkpoint(trained)
    weights, masks = state["model"], half_masks(state["model"])
    # The masks decide, not the values: weights outside the mask are left nonzero in the checkpoint (they must
    # come out as zeros), and one live weight is exactly zero (a regrown connection: still live).
    first = conv_keys(weights)[0]
    live_zero = int(masks[first].flatten().nonzero()[0])
    weights[first] = weights[first].contiguous()
    weights[first].view(-1)[live_zero] = 0.0
    state["structure"] = {"masks": {key.removesuffix(".weight"): mask for key, mask in masks.items()},
                          "step": 7}
    save_atomic(state, tmp_path / "run" / FILENAME)

    out = export(tmp_path / "run", tmp_path / "deep" / "folder" / "student.pt")
    line = capsys.readouterr().out.strip()
    assert "\n" not in line and str(out) in line and "dense" in line and "density 0.5000" in line
    assert f"{out.stat().st_size} bytes" in line

    raw = torch.load(out, weights_only=True)
    assert raw["format"] == DENSE_FORMAT and set(raw) == {"format", "state_dict", "metadata"}
    exported = raw["state_dict"]
    assert list(exported) == list(weights)
    for key, value in weights.items():
        if key in masks:
            expected = torch.where(masks[key], value, torch.zeros((), dtype=value.dtype))
            assert torch.equal(exported[key], expected)
            assert (exported[key][~masks[key]] == 0).all()
            assert not torch.signbit(exported[key]).logical_and(exported[key] == 0).any()  # +0.0, never -0.0
        else:
            assert torch.equal(exported[key], value)

    meta = raw["metadata"]
    total = sum(weights[key].numel() for key in masks)
    linear = int((weights["body.9.weight"] != 0).sum())
    assert meta["density"] == 0.5 and meta["conv_weights_total"] == total == 18720
    assert meta["conv_weights_live"] == total // 2 and meta["connections"] == total // 2 + linear
    assert meta["live_from"] == "structure masks"
    assert meta["layers"][first] == {"shape": list(weights[first].shape), "live": int(masks[first].sum())}
    assert meta["config"] == state["config"] and meta["epoch"] == 1
    last = state["history"][-1]
    assert meta["metrics"] == {key: last[key] for key in ("val_acc", "test_acc", "sops", "energy_uj")}
    assert meta["source"] == str((tmp_path / "run" / FILENAME).resolve())
    assert "code_version" in meta["provenance"] and "version/torch" in meta["provenance"]
    assert "dense" in meta["format_description"]


def test_sparse_export_round_trips_to_the_dense_one_exactly(trained, tmp_path, capsys):
    run, masks = sparse_run(trained, tmp_path / "run", with_masks=False)
    dense = export(run, tmp_path / "dense.pt")
    sparse = export(run, tmp_path / "sparse.pt", "--format", "sparse")
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert "sparse" in line and "x the dense export's" in line

    raw = torch.load(sparse, weights_only=True)
    assert raw["format"] == SPARSE_FORMAT and set(raw) == {"format", "dense", "sparse", "metadata"}
    assert set(raw["sparse"]) == set(masks) and not set(raw["dense"]) & set(masks)
    checkpoint = load_checkpoint(run / FILENAME)["model"]
    for key, entry in raw["sparse"].items():
        weight = checkpoint[key]
        if weight.shape[1] > 1:  # channels_last (with one input channel NHWC and NCHW are the same strides)
            assert not weight.is_contiguous() and not masks[key].is_contiguous()
        assert entry["shape"] == list(weight.shape) and entry["indices"].dtype == torch.int32
        assert torch.equal(entry["indices"].long(), masks[key].contiguous().flatten().nonzero().flatten())
        assert torch.equal(entry["values"], weight.contiguous().flatten()[entry["indices"].long()])

    from_dense, dense_meta = load_export(dense)
    from_sparse, sparse_meta = load_export(sparse)
    assert set(from_sparse) == set(from_dense) == set(checkpoint)
    for key in from_dense:
        assert from_sparse[key].dtype == from_dense[key].dtype
        assert torch.equal(from_sparse[key], from_dense[key]), key
    # Without masks the live set is the nonzero weights: the half zeroed above (-0.0 included) is dead.
    for meta in (dense_meta, sparse_meta):
        assert meta["density"] == 0.5 and meta["live_from"] == "nonzero weights"
    assert dense_meta["connections"] == sparse_meta["connections"]


def test_a_network_built_from_the_config_loads_either_export(trained, tmp_path):
    run, masks = sparse_run(trained, tmp_path / "run", with_masks=True)
    for fmt in ("dense", "sparse"):
        state_dict, meta = load_export(export(run, tmp_path / f"{fmt}.pt", "--format", fmt))
        cfg = TrainConfig.from_dict(meta["config"])
        model = build_model(cfg, num_classes=dataset_spec(cfg.dataset).num_classes, **DIGITS_INPUT)
        model.load_state_dict(state_dict)  # strict: every key, every shape
        for name, conv in model.named_modules():
            if isinstance(conv, torch.nn.Conv2d):
                assert (conv.weight.detach()[~masks[f"{name}.weight"]] == 0).all()


def test_sparse_pays_off_below_half_density_not_at_it(trained, tmp_path):
    """A live weight costs its value and an int32 index, 8 bytes, where dense stores 4 per weight: at 50 %
    the two files are the same size (within the zip's per-tensor overhead), at 90 % sparse is far smaller."""
    sizes = {}
    for share in (0.5, 0.9):
        run, _ = sparse_run(trained, tmp_path / f"run{share}", with_masks=True, share=share)
        for fmt in ("dense", "sparse"):
            sizes[share, fmt] = export(run, tmp_path / f"{share}-{fmt}.pt", "--format", fmt).stat().st_size
    assert 0.95 < sizes[0.5, "sparse"] / sizes[0.5, "dense"] < 1.05, sizes
    assert sizes[0.9, "sparse"] < 0.5 * sizes[0.9, "dense"], sizes


def test_masks_that_do_not_fit_the_network_are_refused(trained, tmp_path):
    state = load_checkpoint(trained)
    state["structure"] = {"masks": {"body.9": torch.ones(10, 256, dtype=torch.bool)}}  # the linear readout
    save_atomic(state, tmp_path / "linear" / FILENAME)
    with pytest.raises(UsageError, match="has a mask for 'body.9', which is not a convolution"):
        export_raising(tmp_path / "linear", tmp_path / "a.pt")
    state["structure"] = {"masks": {"body.0": torch.ones(3, 3, dtype=torch.bool)}}
    save_atomic(state, tmp_path / "shape" / FILENAME)
    with pytest.raises(UsageError, match=r"the mask of 'body.0' is \(3, 3\), its weight \(32, 1, 3, 3\)"):
        export_raising(tmp_path / "shape", tmp_path / "b.pt")


def export_raising(run, out):
    """The export's UsageError itself, not the line main prints for it."""
    return _main([str(run), "--out", str(out)])


def test_load_export_refuses_other_files_naming_them(trained, tmp_path):
    with pytest.raises(UsageError, match=f"'{trained}' is not a rekd student export"):
        load_export(trained)
    out = export(trained, tmp_path / "sparse.pt", "--format", "sparse")
    raw = torch.load(out, weights_only=True)
    raw["sparse"]["body.0.weight"]["indices"][-1] = 10**6
    save_atomic(raw, tmp_path / "broken.pt")
    with pytest.raises(UsageError, match="sparse entry 'body.0.weight' has indices outside its shape"):
        load_export(tmp_path / "broken.pt")


def test_force_overwrites_and_out_may_not_be_the_checkpoint(trained, tmp_path, capsys):
    out = export(trained, tmp_path / "student.pt")
    out.write_bytes(b"old")
    export(trained, out, "--force")
    assert load_export(out)[1]["epoch"] == 1
    capsys.readouterr()
    assert main([str(trained), "--out", str(trained), "--force"]) == 2
    assert "is the checkpoint being exported" in capsys.readouterr().err
    assert load_checkpoint(trained)["format"] == "rekd-checkpoint-1"


@pytest.mark.parametrize("argv, message", [
    (["{tmp}/nothing", "--out", "{tmp}/o.pt"], "RUN '{tmp}/nothing' does not exist"),
    (["{tmp}/empty", "--out", "{tmp}/o.pt"], "is a folder without last.pt"),
    (["{tmp}/other.pt", "--out", "{tmp}/o.pt"], "is not a rekd checkpoint (format rekd-checkpoint-1)"),
    (["{tmp}/corrupt.pt", "--out", "{tmp}/o.pt"], "is corrupt or not a torch file"),
    (["{run}", "--out", "{tmp}/o.pt", "--format", "zip"], "argument --format: invalid choice: 'zip'"),
    (["{run}", "--out", "{tmp}/exists.pt"], "already exists; choose another file or add --force"),
    (["{run}"], "the following arguments are required: --out"),
])
def test_bad_input_from_the_shell_is_one_line_and_status_2(argv, message, trained, tmp_path):
    (tmp_path / "empty").mkdir()
    torch.save({"weights": torch.ones(2)}, tmp_path / "other.pt")
    (tmp_path / "corrupt.pt").write_bytes(b"not a torch file")
    (tmp_path / "exists.pt").write_bytes(b"keep me")
    fill = lambda s: s.format(tmp=tmp_path, run=trained.parent)  # noqa: E731
    proc = subprocess.run([sys.executable, "-m", "rekd.export", *map(fill, argv)], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert_usage_error(proc.returncode, proc.stdout, proc.stderr, fill(message))
    assert not (tmp_path / "o.pt").exists() and (tmp_path / "exists.pt").read_bytes() == b"keep me"

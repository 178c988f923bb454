"""`python -m rekd.export RUN --out FILE [--format dense|sparse]`: a trained student's weights as a file of its own.

RUN is a run folder holding last.pt (rekd.train.checkpoint) or the path of such a checkpoint. The export
carries the student network only (no optimizer, RNG or history) and reads back with
torch.load(weights_only=True): dicts, lists, strings, numbers and tensors, nothing else. `load_export` reads
either format and returns a dense state dict that `build_model(cfg, ...).load_state_dict` takes.

Which conv weights are live
    The convolution weights are the 4-D tensors of the checkpoint's state dict (batch norm entries are 1-D,
    the linear readout 2-D, counters 0-D). Where the checkpoint has "structure": {"masks": {module name:
    bool tensor shaped like that module's weight}}, a weight `<module name>.weight` is live where its mask is
    true, even if its value is 0 (a connection regrown at zero is still a connection), and dead elsewhere,
    whatever value the checkpoint holds there. A conv weight without a mask (or every one, where the
    checkpoint has no masks) is live where it is nonzero.

Format "rekd-student-dense-1" (`--format dense`, the default)
    {"format": "rekd-student-dense-1",
     "state_dict": {key: tensor},   # the student's full state dict; dead conv weights are exactly +0.0
     "metadata": {...}}

Format "rekd-student-sparse-1" (`--format sparse`)
    {"format": "rekd-student-sparse-1",
     "dense": {key: tensor},        # every entry of the state dict that is not a conv weight, as it is
     "sparse": {key: {              # every conv weight
         "shape": [int, ...],       # the weight's shape, e.g. [out_ch, in_ch, kH, kW]
         "indices": tensor,         # 1-D, ascending: flat row-major (C order) positions of the live weights
                                    # in that shape, i.e. into weight.contiguous().flatten(); int32 when the
                                    # weight has fewer than 2**31 elements, else int64
         "values": tensor}},        # 1-D, the live weights at those positions, in the weight's dtype
     "metadata": {...}}
    The dense weight is zeros(shape) with weight.view(-1)[indices] = values. Every key of the state dict is
    in exactly one of "dense" and "sparse".

"metadata", in both formats
    format_description  str: one line saying what the file holds
    density             float: live conv weights / all conv weights
    conv_weights_live, conv_weights_total   int
    connections         int: live weights of every synaptic layer (live conv weights + nonzero linear weights)
    live_from           str: "structure masks", "nonzero weights", or both joined by " + "
    layers              {key: {"shape": [int, ...], "live": int}} for every conv weight
    config              dict: the run's TrainConfig (rekd.config), which names arch and dataset
    epoch               int: epochs the checkpoint had completed
    generation          int: the student's generation (sparse_kd with generations), where the checkpoint has one
    metrics             dict: the last epoch's val_acc, test_acc, sops and energy_uj, those it has
    source              str: absolute path of the checkpoint read
    provenance          dict: rekd.provenance.provenance() at export time
"""
from __future__ import annotations

import io
import math
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from rekd.cli import Parser, run
from rekd.errors import UsageError
from rekd.provenance import provenance
from rekd.storage import load_tensors, save_atomic
from rekd.train.checkpoint import FILENAME, load_checkpoint

PROG = "python -m rekd.export"
DENSE_FORMAT = "rekd-student-dense-1"
SPARSE_FORMAT = "rekd-student-sparse-1"
FORMATS = {"dense": DENSE_FORMAT, "sparse": SPARSE_FORMAT}
DESCRIPTIONS = {
    DENSE_FORMAT: "rekd student weights, dense: the full state dict, dead conv weights exactly zero",
    SPARSE_FORMAT: "rekd student weights, sparse: conv weights as row-major flat indices and values of the live "
                   "weights, every other state-dict entry dense",
}
METRIC_KEYS = ("val_acc", "test_acc", "sops", "energy_uj")


# -- what is live ------------------------------------------------------------------------------------
def conv_keys(state_dict: dict) -> list[str]:
    """The state-dict keys of the convolution weights: its 4-D tensors.

    Told apart by shape rather than by rebuilding the network, which needs the dataset's channels and
    resolution and so the dataset itself, which need not be on the machine that exports. In rekd's
    architectures only nn.Conv2d weights are 4-D.
    """
    return [key for key, value in state_dict.items() if torch.is_tensor(value) and value.dim() == 4]


def live_masks(state: dict, source: str) -> tuple[dict[str, torch.Tensor], str]:
    """{conv key: bool mask of its live weights} of a checkpoint, and which rule decided them."""
    weights = state["model"]
    keys = conv_keys(weights)
    if not keys:
        raise UsageError(f"checkpoint {source!r} holds no convolution weights (no 4-D tensors in its model)")
    structure = state.get("structure")
    given = (structure.get("masks") if isinstance(structure, dict) else None) or {}
    masks, rules = {}, set()
    for name, mask in given.items():
        key = name if name in weights and name.endswith(".weight") else f"{name}.weight"
        if key not in keys:
            raise UsageError(f"checkpoint {source!r} has a mask for {name!r}, which is not a convolution of its model")
        if not torch.is_tensor(mask) or tuple(mask.shape) != tuple(weights[key].shape):
            shape = tuple(mask.shape) if torch.is_tensor(mask) else type(mask).__name__
            raise UsageError(f"checkpoint {source!r}: the mask of {name!r} is {shape}, "
                             f"its weight {tuple(weights[key].shape)}")
        masks[key] = mask.to(torch.bool)
        rules.add("structure masks")
    for key in keys:
        if key not in masks:
            masks[key] = weights[key] != 0
            rules.add("nonzero weights")
    return {key: masks[key] for key in keys}, " + ".join(sorted(rules, reverse=True))


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    # Row-major storage of its own: the flat indices count over the logical shape, and a saved view would
    # carry its whole base storage into the file.
    return tensor.detach().cpu().contiguous().clone()


# -- building the exports ------------------------------------------------------------------------------
def dense_state_dict(weights: dict, masks: dict[str, torch.Tensor]) -> dict:
    """The state dict with every dead conv weight set to +0.0 (masked_fill: w * 0 would give -0.0 for w < 0)."""
    return {key: _plain(value.masked_fill(~masks[key], 0)) if key in masks else value
            for key, value in weights.items()}


def sparse_entry(weight: torch.Tensor, mask: torch.Tensor) -> dict:
    flat_weight, flat_mask = _plain(weight).view(-1), _plain(mask).view(-1)
    index_dtype = torch.int32 if flat_weight.numel() < 2**31 else torch.int64
    indices = torch.nonzero(flat_mask).view(-1)
    return {"shape": list(weight.shape), "indices": indices.to(index_dtype).clone(),
            "values": flat_weight[indices].clone()}


def metadata(state: dict, masks: dict[str, torch.Tensor], rule: str, source: Path, fmt: str) -> dict:
    weights = state["model"]
    live = {key: int(mask.sum()) for key, mask in masks.items()}
    total = sum(weights[key].numel() for key in masks)
    # The linear readout's synapses: 2-D weights; nonzero ones count as connections.
    linear = sum(int((value != 0).sum()) for key, value in weights.items()
                 if torch.is_tensor(value) and value.dim() == 2 and key.endswith(".weight"))
    last = state["history"][-1] if state.get("history") else {}
    meta = {
        "format_description": DESCRIPTIONS[fmt],
        "density": sum(live.values()) / total,
        "conv_weights_live": sum(live.values()),
        "conv_weights_total": total,
        "connections": sum(live.values()) + linear,
        "live_from": rule,
        "layers": {key: {"shape": list(weights[key].shape), "live": live[key]} for key in masks},
        "config": dict(state["config"]),
        "epoch": int(state["epoch"]),
        "metrics": {key: last[key] for key in METRIC_KEYS if key in last},
        "source": str(source.resolve()),
        "provenance": provenance(),
    }
    if "generation" in state:  # sparse_kd with generations: which student of the chain this is
        meta["generation"] = int(state["generation"])
    return meta


def build_export(state: dict, source: Path, fmt: str = DENSE_FORMAT) -> dict:
    """The export of a loaded checkpoint in format `fmt` (DENSE_FORMAT or SPARSE_FORMAT)."""
    weights = state["model"]
    masks, rule = live_masks(state, str(source))
    meta = metadata(state, masks, rule, source, fmt)
    if fmt == DENSE_FORMAT:
        return {"format": fmt, "state_dict": dense_state_dict(weights, masks), "metadata": meta}
    return {
        "format": fmt,
        "dense": {key: value for key, value in weights.items() if key not in masks},
        "sparse": {key: sparse_entry(weights[key], masks[key]) for key in masks},
        "metadata": meta,
    }


# -- reading back -------------------------------------------------------------------------------------
def load_export(path: str | Path) -> tuple[dict, dict]:
    """(dense state dict, metadata) of an export in either format; anything else is a UsageError."""
    content = load_tensors(path, "export")
    fmt = content.get("format") if isinstance(content, dict) else None
    if fmt not in DESCRIPTIONS:
        raise UsageError(f"{str(path)!r} is not a rekd student export (format {DENSE_FORMAT} or {SPARSE_FORMAT})")
    if fmt == DENSE_FORMAT:
        return dict(content["state_dict"]), content["metadata"]
    state_dict = dict(content["dense"])
    for key, entry in content["sparse"].items():
        state_dict[key] = _densify(entry, f"{str(path)!r}: sparse entry {key!r}")
    return state_dict, content["metadata"]


def _densify(entry: dict, where: str) -> torch.Tensor:
    shape, indices, values = entry.get("shape"), entry.get("indices"), entry.get("values")
    if not (isinstance(shape, list) and torch.is_tensor(indices) and torch.is_tensor(values)
            and indices.dim() == values.dim() == 1 and len(indices) == len(values)
            and not indices.is_floating_point()):
        raise UsageError(f"{where} is malformed (needs shape, and 1-D indices and values of one length)")
    numel = math.prod(shape)
    if len(indices) and not (0 <= int(indices.min()) and int(indices.max()) < numel):
        raise UsageError(f"{where} has indices outside its shape {shape}")
    dense = torch.zeros(numel, dtype=values.dtype)
    dense[indices.long()] = values
    return dense.view(shape)


# -- command line ----------------------------------------------------------------------------------------
def build_parser() -> Parser:
    p = Parser(prog=PROG, description="Export the student network of a training run's checkpoint, dense or sparse.")
    p.add_argument("run", metavar="RUN", help=f"a run folder holding {FILENAME}, or the path of a checkpoint")
    p.add_argument("--out", required=True, metavar="FILE", help="the file to write (parent folders are created)")
    p.add_argument("--format", choices=tuple(FORMATS), default="dense",
                   help="dense: the full state dict, pruned weights zero (default) | sparse: conv weights as "
                        "indices and values of the live ones")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    return p


def checkpoint_path(run_arg: str) -> Path:
    path = Path(run_arg)
    if path.is_dir():
        if not (path / FILENAME).is_file():
            raise UsageError(f"RUN {run_arg!r} is a folder without {FILENAME}; expected a run folder or a checkpoint file")
        return path / FILENAME
    if not path.exists():
        raise UsageError(f"RUN {run_arg!r} does not exist; expected a run folder or a checkpoint file")
    return path


def serialized_size(obj: dict) -> int:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.tell()


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run(_main, PROG, argv)


def _main(argv: Optional[Sequence[str]]) -> int:
    args = build_parser().parse_args(argv)
    source = checkpoint_path(args.run)
    out = Path(args.out)
    if out.is_dir():
        raise UsageError(f"--out {args.out} is a folder; give the file to write")
    if out.exists() and out.resolve() == source.resolve():
        raise UsageError(f"--out {args.out} is the checkpoint being exported; choose another file")
    if out.exists() and not args.force:
        raise UsageError(f"--out {args.out} already exists; choose another file or add --force to overwrite it")
    state = load_checkpoint(source)
    fmt = FORMATS[args.format]
    export = build_export(state, source, fmt)
    save_atomic(export, out)
    size = out.stat().st_size
    meta = export["metadata"]
    line = (f"wrote {out} ({args.format}, {fmt}): density {meta['density']:.4f} "
            f"({meta['conv_weights_live']}/{meta['conv_weights_total']} conv weights live), "
            f"{meta['connections']} connections, {size} bytes")
    if fmt == SPARSE_FORMAT:
        # How much the sparse encoding saves, against the dense file this checkpoint would give.
        dense_size = serialized_size(build_export(state, source, DENSE_FORMAT))
        line += f" ({size / dense_size:.2f}x the dense export's {dense_size} bytes)"
    print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

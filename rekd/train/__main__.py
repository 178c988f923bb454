"""`python -m rekd.train MODE`: one training run (baseline, sparse_kd or default_kd) from the command line.

Writes <run dir>/config.json (resolved), provenance.json (code and library versions), metrics.jsonl
(one line per epoch) and last.pt (the checkpoint `--resume` continues from).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from rekd.train.checkpoint import FILENAME, load_checkpoint
from rekd.cli import Parser, format_metrics, run
from rekd.config import MODES, TrainConfig, read_settings_file
from rekd.datasets import load_dataset
from rekd.errors import UsageError
from rekd.train.optim import for_device
from rekd.provenance import provenance
from rekd.snn.teachers import cpu_weights, load_cached_teacher, store_teacher
from rekd.train.loop import NonFiniteLoss, ensure_teacher, resolve, select_device, train

PROG = "python -m rekd.train"
LINE_KEYS = ("train_loss", "train_ce", "train_kd", "train_acc", "val_acc", "test_acc", "teacher_val_acc",
             "density", "firing_rate", "sops", "energy_uj", "epoch_time_s", "samples_per_s")
FLAG_FIELDS = ("dataset", "arch", "epochs", "data_root", "seed", "device", "cache_dir")


def build_parser() -> Parser:
    p = Parser(prog=PROG, description="Train one spiking network: baseline, sparse_kd or default_kd.")
    p.add_argument("mode", nargs="?", choices=MODES, help="what to train (optional with --resume)")
    p.add_argument("--dataset", help="digits (default) | ndigits | cifar100 | dvsgesture")
    p.add_argument("--arch", help="tiny (default) | resnet18 | wrn16_4 | vgg16")
    p.add_argument("--epochs", type=int, help="training epochs (default 8)")
    p.add_argument("--data-root", help="folder with cifar-100-python/ or DVSGesture/ (default ./data)")
    p.add_argument("--seed", type=int, help="random seed (default 0)")
    p.add_argument("--device", help="auto (default) | cpu | cuda | cuda:N")
    p.add_argument("--cache-dir", help="generated data, frames and teachers (default ~/.cache/rekd)")
    p.add_argument("--config", metavar="FILE", help="YAML mapping of settings; flags override it")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any setting of rekd.config.TrainConfig, e.g. --set prune_ratio=0.3 (repeatable)")
    p.add_argument("--eval-test", action="store_true", help="also score the test split each epoch")
    p.add_argument("--out", metavar="DIR", help="run folder (default runs/<mode>-<dataset>-<arch>-s<seed>-<time>)")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar even on a terminal")
    return p


def config_from_args(args) -> TrainConfig:
    if args.resume:
        state = load_checkpoint(Path(args.resume) / FILENAME)
        cfg = TrainConfig.from_dict(state["config"], source=f"checkpoint {args.resume}")
        if args.mode and args.mode != cfg.mode:
            raise UsageError(f"--resume {args.resume} is a {cfg.mode} run; mode {args.mode!r} does not match it")
        return cfg
    if not args.mode:
        raise UsageError(f"a mode is required; allowed: {' | '.join(MODES)}")
    base = read_settings_file(args.config) if args.config else {}
    cfg = TrainConfig.from_dict({**base, "mode": args.mode}, source=args.config or "config")
    direct = {name: getattr(args, name) for name in FLAG_FIELDS if getattr(args, name) is not None}
    if args.eval_test:
        direct["eval_test"] = True
    return cfg.with_overrides(args.set, **direct)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run(_main, PROG, argv)


def _main(argv: Optional[Sequence[str]]) -> int:
    args = build_parser().parse_args(argv)
    cfg = resolve(config_from_args(args))
    cfg = for_device(cfg, select_device(cfg.device))  # config.json says whether it compiled and in what precision
    progress = sys.stderr.isatty() and not args.no_progress
    # Everything that can fail because of the user's input fails here, before anything is written.
    data = load_dataset(cfg)
    teacher_weights = None
    if cfg.mode == "sparse_kd":
        with fits_the_gpu(cfg):  # the teacher trains first where none is cached, at the same batch size
            teacher_weights = ensure_teacher(cfg, data, progress=progress,
                                             on_epoch=lambda m: print_epoch("[teacher] ", m, cfg.teacher_epochs))
    run_dir = Path(args.resume or args.out or default_run_dir(cfg))
    if not args.resume and (run_dir / "last.pt").exists():
        raise UsageError(f"--out {run_dir} already holds a run; continue it with --resume {run_dir} or choose another folder")
    run_dir.mkdir(parents=True, exist_ok=True)
    if not args.resume:
        (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        (run_dir / "provenance.json").write_text(json.dumps(provenance(), indent=2) + "\n")
    student = "" if cfg.structure == "dense" else f", {cfg.structure} student at sparsity {cfg.target_sparsity:g}"
    generations = f" x {cfg.generations} generations" if cfg.generations > 1 else ""
    print(f"{cfg.mode} on {cfg.dataset} with {cfg.arch}: T={cfg.timesteps}, {cfg.epochs} epochs{generations}{student}, "
          f"seed {cfg.seed} -> {run_dir}", flush=True)

    def on_epoch(metrics: dict) -> None:
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")
        print_epoch(f"[generation {metrics['generation']}] " if cfg.generations > 1 else "", metrics, cfg.total_epochs)

    try:
        with fits_the_gpu(cfg):
            result = train(cfg, data=data, teacher_weights=teacher_weights, on_epoch=on_epoch, run_dir=run_dir,
                           progress=progress)
    except NonFiniteLoss as e:
        print(f"{PROG}: stopped: {e}; try a lower lr (checkpoint of the last good epoch in {run_dir})", file=sys.stderr)
        return 1
    if cfg.mode == "baseline" and cfg.structure == "dense":  # the teacher sparse_kd runs of this config look for
        as_teacher = dataclasses.replace(cfg, teacher_epochs=cfg.epochs)
        if load_cached_teacher(as_teacher) is None:
            print(f"cached as the sparse_kd teacher for this config: "
                  f"{store_teacher(as_teacher, cpu_weights(result.model), result.final['val_acc'])}", flush=True)
    best = max(result.history, key=lambda m: m["val_acc"])
    print(f"done: val_acc={result.final['val_acc']:.4f} (best {best['val_acc']:.4f} at epoch {best['epoch']}); "
          f"run folder {run_dir}", flush=True)
    return 0


@contextlib.contextmanager
def fits_the_gpu(cfg):
    """A CUDA out-of-memory error as the user's one line: the batch does not fit this card (not a bug)."""
    try:
        yield
    except torch.OutOfMemoryError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "CUDA out of memory"
        raise UsageError(f"batch_size={cfg.batch_size} (T={cfg.timesteps}, {cfg.arch}) does not fit the GPU: "
                         f"{first[:160]}; lower batch_size (--set batch_size=N)") from None


def print_epoch(prefix: str, metrics: dict, epochs: int) -> None:
    print(f"{prefix}epoch {metrics['epoch']}/{epochs} {format_metrics(metrics, LINE_KEYS)}", flush=True)


def default_run_dir(cfg: TrainConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{cfg.mode}-{cfg.dataset}-{cfg.arch}-s{cfg.seed}-{stamp}"


if __name__ == "__main__":
    sys.exit(main())

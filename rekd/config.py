"""All settings of one training run: a frozen dataclass that validates itself.

Built from a dict (YAML, JSON, a checkpoint) or from `key=value` strings (the CLI's `--set`); unknown keys,
wrong types and out-of-range values raise UsageError naming the key and what is allowed.
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Optional

from rekd.errors import UsageError

MODES = ("baseline", "sparse_kd", "default_kd")
OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("cosine", "constant")
SURROGATES = ("atan", "sigmoid")
COMPILE = ("auto", "true", "false")
STRUCTURES = ("dense", "gmp", "rewire")  # how a student's conv connections are learned (rekd.snn.structure)
REGROWTH = ("gradient", "random")
KD_REDUCTIONS = ("batchmean", "elementwise")  # rekd.snn.losses: how the KL term is averaged
DEFAULT_LR = {"sgd": 0.1, "adam": 1e-3}
# Usual slopes for each surrogate (spikingjelly's defaults).
DEFAULT_SURROGATE_ALPHA = {"atan": 2.0, "sigmoid": 4.0}


def default_cache_dir() -> str:
    return os.environ.get("REKD_CACHE_DIR") or str(Path.home() / ".cache" / "rekd")


@dataclass(frozen=True)
class TrainConfig:
    mode: str = "baseline"  # baseline (cross-entropy only) | sparse_kd (Eq. 5) | default_kd (Eq. 7)
    dataset: str = "digits"  # a key of rekd.datasets.DATASETS
    arch: str = "tiny"  # a key of rekd.snn.models.ARCHS
    data_root: str = "data"  # folder holding cifar100 / dvsgesture in their release layouts
    download: bool = False  # let torchvision fetch CIFAR-100 into data_root when it is missing
    cache_dir: str = dataclasses.field(default_factory=default_cache_dir)  # generated data, frames, teachers
    timesteps: Optional[int] = None  # T; None = the dataset's default (4 static, 16 for dvsgesture)
    downsample: int = 1  # spatial downsampling of event frames (dvsgesture, ndigits)
    epochs: int = 8  # training epochs of this run
    batch_size: int = 32  # samples per optimizer step
    optimizer: str = "sgd"  # sgd (momentum, nesterov off) | adam
    lr: Optional[float] = None  # peak learning rate; None = 0.1 for sgd, 1e-3 for adam
    momentum: float = 0.9  # sgd only
    weight_decay: float = 5e-4  # L2 on all parameters
    schedule: str = "cosine"  # cosine annealing to 0 over all steps | constant
    surrogate: str = "atan"  # surrogate gradient of the spike: atan | sigmoid
    surrogate_alpha: Optional[float] = None  # slope; None = 2.0 for atan, 4.0 for sigmoid
    v_threshold: float = 1.0  # IF firing threshold
    v_reset: Optional[float] = 0.0  # hard reset to this potential; None = soft reset (subtract threshold)
    detach_reset: bool = False  # cut the reset out of the surrogate gradient
    prune_ratio: float = 0.0  # sparse_kd: share of conv weights the teacher loses (Eq. 3)
    temperature: float = 4.0  # softening temperature T of Eq. 4
    alpha: float = 0.5  # weight of the distillation term (Eq. 5, 7)
    confidence: float = 0.95  # default_kd: the virtual teacher's probability on the true class (Eq. 6)
    # The KL term of Eq. 5 and 7 averaged over the batch (batchmean: the equations as written) or over every
    # element, batch x classes (elementwise: the cited code's nn.KLDivLoss default, 1/C as large).
    kd_reduction: str = "batchmean"
    # Sparse students (rekd.snn.structure): dense | gmp (gradual magnitude pruning from dense to target_sparsity
    # on a cubic ramp) | rewire (target_sparsity from the start, connections dropped and regrown while learning).
    structure: str = "dense"
    target_sparsity: float = 0.0  # gmp, rewire: share of the student's conv weights that are zero
    sparsity_start_epoch: int = 0  # gmp: the ramp from dense starts here; rewire: rewiring starts here
    sparsity_end_epoch: Optional[int] = None  # gmp: target reached; rewire: topology fixed from here; None = 3/4 of epochs
    prune_every: int = 20  # optimizer steps between mask updates
    regrow: str = "gradient"  # rewire: regrow where |gradient| is largest (RigL) | at random (SET)
    rewire_fraction: float = 0.3  # rewire: share of live weights dropped and regrown per update, cosine-decayed to 0
    generations: int = 1  # sparse_kd: each generation's student, pruned at prune_ratio, teaches the next
    inherit_mask: bool = False  # generations: a new student starts from its teacher's mask instead of its own
    teacher_epochs: Optional[int] = None  # epochs of the baseline that becomes the teacher; None = epochs
    seed: int = 0  # seeds weights, shuffling, augmentation and the validation split
    val_fraction: float = 0.1  # share of the training split held out for validation
    eval_test: bool = False  # also score the test split every epoch (final runs, not tuning)
    device: str = "auto"  # auto (cuda when present) | cpu | cuda | cuda:N
    # bf16 autocast on CUDA (fp16 with loss scaling on GPUs without bf16); fp32 on CPU. None = auto: on where the
    # training step is compiled, off in eager mode, where bf16 measured slower than fp32 (README, Performance).
    amp: Optional[bool] = None
    channels_last: bool = True  # NHWC activations and conv weights: faster pooling on CPUs, tensor cores on GPUs
    # torch.compile the student's and the teacher's bodies: auto = on CUDA, and on CPUs where rekd.bench.cpu shows
    # it pays (rekd.train.optim.for_device) | true | false. Numerics as eager up to float rounding.
    compile: str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.compile, bool):  # YAML's `compile: true` and a search space's [true, false]
            object.__setattr__(self, "compile", str(self.compile).lower())
        for f in fields(self):
            _check_type(f.name, getattr(self, f.name), FIELD_TYPES[f.name])
        for name, (ok, allowed) in _CHECKS.items():
            value = getattr(self, name)
            if value is not None and not ok(value):
                raise UsageError(f"{name}={value!r} is not allowed; allowed: {allowed}")
        if self.v_reset is not None and self.v_reset >= self.v_threshold:
            raise UsageError(f"v_reset={self.v_reset} must be below v_threshold={self.v_threshold}")
        self._check_structure()

    def _check_structure(self) -> None:
        if self.structure == "dense" and self.target_sparsity > 0:
            raise UsageError(f"target_sparsity={self.target_sparsity} needs structure=gmp or structure=rewire "
                             "(structure=dense trains every connection)")
        if self.sparsity_start_epoch >= self.epochs:
            raise UsageError(f"sparsity_start_epoch={self.sparsity_start_epoch} must be below epochs={self.epochs}")
        end = self.sparsity_end_epoch
        if end is not None and not self.sparsity_start_epoch < end <= self.epochs:
            raise UsageError(f"sparsity_end_epoch={end} is not allowed; allowed: after sparsity_start_epoch="
                             f"{self.sparsity_start_epoch} and at most epochs={self.epochs}")
        if self.generations > 1 and self.mode != "sparse_kd":
            raise UsageError(f"generations={self.generations} needs mode=sparse_kd (each generation's student, "
                             f"pruned at prune_ratio, teaches the next); this run is mode={self.mode}")

    # -- building ------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: Mapping[str, Any], *, source: str = "config") -> "TrainConfig":
        """Build from a mapping; unknown keys are refused with the list of known ones."""
        if not isinstance(values, Mapping):
            raise UsageError(f"{source}: expected a mapping of settings, got {type(values).__name__}")
        unknown = sorted(set(values) - set(FIELD_TYPES))
        if unknown:
            raise UsageError(f"{source}: unknown setting {unknown[0]!r}; allowed: {', '.join(FIELD_TYPES)}")
        return cls(**dict(values))

    def with_overrides(self, assignments: list[str] | tuple[str, ...] = (), **values: Any) -> "TrainConfig":
        """A copy with `key=value` strings (parsed by the field's type) and keyword values applied."""
        parsed = dict(values)
        for item in assignments:
            key, sep, text = item.partition("=")
            key = key.strip()
            if not sep or not key:
                raise UsageError(f"--set {item!r}: expected key=value")
            if key not in FIELD_TYPES:
                raise UsageError(f"--set: unknown setting {key!r}; allowed: {', '.join(FIELD_TYPES)}")
            parsed[key] = parse_value(key, text.strip(), FIELD_TYPES[key])
        return self.from_dict({**self.to_dict(), **parsed})

    def resolved(self, default_timesteps: int) -> "TrainConfig":
        """Fill the `None = default` fields so that the recorded config says what actually ran."""
        return dataclasses.replace(
            self,
            timesteps=self.timesteps or default_timesteps,
            lr=self.lr if self.lr is not None else DEFAULT_LR[self.optimizer],
            surrogate_alpha=self.surrogate_alpha or DEFAULT_SURROGATE_ALPHA[self.surrogate],
            teacher_epochs=self.teacher_epochs or self.epochs,
        )

    @property
    def sparsity_end(self) -> int:
        """The epoch gmp reaches its target and rewire stops: sparsity_end_epoch, or 3/4 of epochs when it is
        None. Left unresolved in a recorded config, so that a run of that config with other epochs
        (rekd.final --epochs) keeps the proportion instead of a window that no longer fits."""
        return self.sparsity_end_epoch or default_sparsity_end(self.sparsity_start_epoch, self.epochs)

    @property
    def total_epochs(self) -> int:
        """Epochs of the whole run: every generation's (a trial's budget, the last epoch number reported)."""
        return self.epochs * self.generations

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def default_sparsity_end(start: int, epochs: int) -> int:
    """The structure is fixed for the last quarter of the run (Zhu & Gupta's and RigL's practice): the
    weights fine-tune on their final connections."""
    return min(epochs, max(start + 1, round(0.75 * epochs)))


FIELD_TYPES: dict[str, Any] = typing.get_type_hints(TrainConfig)

_CHECKS: dict[str, tuple[Any, str]] = {
    "mode": (lambda v: v in MODES, " | ".join(MODES)),
    "optimizer": (lambda v: v in OPTIMIZERS, " | ".join(OPTIMIZERS)),
    "schedule": (lambda v: v in SCHEDULES, " | ".join(SCHEDULES)),
    "surrogate": (lambda v: v in SURROGATES, " | ".join(SURROGATES)),
    "timesteps": (lambda v: 1 <= v <= 1024, "an integer 1..1024"),
    "downsample": (lambda v: 1 <= v <= 64, "an integer 1..64"),
    "epochs": (lambda v: v >= 1, "an integer >= 1"),
    "teacher_epochs": (lambda v: v >= 1, "an integer >= 1"),
    "batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "lr": (lambda v: 0 < v <= 10, "0 < lr <= 10"),
    "momentum": (lambda v: 0 <= v < 1, "0 <= momentum < 1"),
    "weight_decay": (lambda v: 0 <= v < 1, "0 <= weight_decay < 1"),
    "surrogate_alpha": (lambda v: v > 0, "a number > 0"),
    "v_threshold": (lambda v: v > 0, "a number > 0"),
    "prune_ratio": (lambda v: 0 <= v < 1, "0 <= prune_ratio < 1"),
    "temperature": (lambda v: v > 0, "a number > 0"),
    "structure": (lambda v: v in STRUCTURES, " | ".join(STRUCTURES)),
    "target_sparsity": (lambda v: 0 <= v < 1, "0 <= target_sparsity < 1"),
    "sparsity_start_epoch": (lambda v: v >= 0, "an integer >= 0"),
    "sparsity_end_epoch": (lambda v: v >= 1, "an integer >= 1"),
    "prune_every": (lambda v: v >= 1, "an integer >= 1 (optimizer steps)"),
    "regrow": (lambda v: v in REGROWTH, " | ".join(REGROWTH)),
    "rewire_fraction": (lambda v: 0 < v < 1, "0 < rewire_fraction < 1"),
    "generations": (lambda v: 1 <= v <= 100, "an integer 1..100"),
    "alpha": (lambda v: 0 <= v <= 1, "0 <= alpha <= 1"),
    "confidence": (lambda v: 0 < v < 1, "1/num_classes < confidence < 1"),
    "kd_reduction": (lambda v: v in KD_REDUCTIONS, " | ".join(KD_REDUCTIONS)),
    "seed": (lambda v: 0 <= v < 2**32, "an integer 0..2**32-1"),
    "val_fraction": (lambda v: 0 < v <= 0.5, "0 < val_fraction <= 0.5"),
    "device": (lambda v: v in ("auto", "cpu", "cuda") or v.startswith("cuda:"), "auto | cpu | cuda | cuda:N"),
    "compile": (lambda v: v in COMPILE, " | ".join(COMPILE)),
    "dataset": (lambda v: v != "", "a dataset name"),
    "arch": (lambda v: v != "", "an architecture name"),
}


_KIND = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def base_type(annotation: Any) -> tuple[type, bool]:
    """(type, optional) of an annotation such as `Optional[int]`."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return inner[0], True
    return annotation, False


def _check_type(name: str, value: Any, annotation: Any) -> None:
    base, optional = base_type(annotation)
    if value is None and optional:
        return
    ok = isinstance(value, base) and not (base is not bool and isinstance(value, bool))
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        kind = _KIND[base]
        if optional:
            kind += " or none"
        raise UsageError(f"{name}={value!r} has the wrong type; allowed: {kind}")


def parse_value(name: str, text: str, annotation: Any) -> Any:
    """Turn the text of `--set name=text` into the field's type."""
    base, optional = base_type(annotation)
    if optional and text.lower() in ("none", "null", ""):
        return None
    try:
        if base is bool:
            lowered = text.lower()
            if lowered in ("true", "1", "yes", "on"):
                return True
            if lowered in ("false", "0", "no", "off"):
                return False
            raise ValueError(text)
        return base(text)
    except ValueError:
        raise UsageError(f"{name}={text!r} has the wrong type; allowed: {_KIND[base]}") from None


def read_settings_file(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML file that must hold a mapping; anything else is a UsageError naming the file."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise UsageError(f"{path}: cannot be read ({e.strerror or e})") from None
    try:
        content = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise UsageError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(content, dict):
        raise UsageError(f"{path}: expected a mapping of key: value settings, got {type(content).__name__}")
    return content

"""What a reproduction runs (rekd.evaluate.reproduce checks it; rekd.evaluate.reproduce_run runs it): the
plan, and the training runs it is made of."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from rekd.config import TrainConfig

# The distillation settings of each mode, the ones a reproduction takes from a search's best configuration.
KD_SETTINGS = {"sparse_kd": ("temperature", "alpha", "kd_reduction"),
               "default_kd": ("confidence", "temperature", "alpha", "kd_reduction")}


@dataclass(frozen=True)
class RunSpec:
    """One training run of the protocol."""
    kind: str  # baseline (the student without distillation, also the teacher) | kd
    seed: int
    prune_ratio: Optional[float]  # table1's KD runs; None otherwise
    config: TrainConfig  # resolved, eval_test on
    variant: str = ""  # the structure table's row: a student's structure and teacher

    @property
    def label(self) -> str:
        where = f"seed {self.seed}" + ("" if self.prune_ratio is None else f" prune {self.prune_ratio:g}")
        return f"{where}: {self.variant or self.kind}"

    @property
    def key(self) -> tuple:
        return self.kind, self.seed, self.prune_ratio, self.variant


def structure_variants(sparsities: tuple[float, ...], generations: int = 2) -> tuple[tuple[str, dict], ...]:
    """The structure table's students besides the dense baseline: the dense sparse-KD student; gmp and rewire at
    each sparsity, without a teacher (cross-entropy only) and taught by the pruned teacher; and gmp at the
    middle sparsity over `generations` generations, each taught by the one before."""
    variants = [("dense + KD", {"mode": "sparse_kd"})]
    for structure in ("gmp", "rewire"):
        for sparsity in sparsities:
            sparse = {"structure": structure, "target_sparsity": sparsity}
            variants.append((f"{structure} {sparsity:g}", {"mode": "baseline", **sparse}))
            variants.append((f"{structure} {sparsity:g} + KD", {"mode": "sparse_kd", **sparse}))
    middle = sparsities[len(sparsities) // 2]
    variants.append((f"gmp {middle:g} + KD, {generations} generations",
                     {"mode": "sparse_kd", "structure": "gmp", "target_sparsity": middle, "generations": generations}))
    return tuple(variants)


@dataclass(frozen=True)
class ReproducePlan:
    """Everything a reproduction needs, resolved and checked before Ray starts."""
    table: str  # table1 | table2
    base: TrainConfig  # the KD config of seed 0, resolved; each run replaces mode, seed and prune_ratio
    seeds: tuple[int, ...]
    ratios: tuple[float, ...]  # table1's prune ratios; () for table2
    kd_sources: dict  # distillation setting -> where its value came from
    out_dir: Path  # this reproduction's files go to out_dir / name
    name: str
    tracking_uri: str
    experiment: str
    cpus: float  # per task, the study's resources
    gpus: float  # per task (rekd.search.ray_session.gpu_request: not where no GPU will ever be)
    best_file: Optional[str] = None
    notes: tuple[str, ...] = ()  # said at the start, e.g. a best file tuned on other data
    verbose: bool = False  # libraries' logs and a private Ray's worker output on the console too
    cpu_only: bool = False  # tasks request no GPU, whatever the study asks
    variants: tuple = ()  # the structure table's rows after the baseline: (name, settings) pairs

    @property
    def kd_settings(self) -> dict:
        return {k: getattr(self.base, k) for k in KD_SETTINGS[self.base.mode]}

    def settings_text(self, sources: bool) -> str:
        """`temperature=4 (source), alpha=0.5 (source), kd_reduction=batchmean (source)`, sources if asked."""
        return ", ".join((f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}")
                         + (f" ({self.kd_sources[k]})" if sources else "") for k, v in self.kd_settings.items())

    def runs(self) -> list[RunSpec]:
        """The baselines of all seeds (stage 1), then every KD student (stage 2)."""
        specs = [RunSpec("baseline", s, None, dataclasses.replace(self.base, mode="baseline", seed=s))
                 for s in self.seeds]
        if self.variants:  # the structure table: every variant taught (if at all) by the one pruned teacher
            ratio = self.ratios[0]
            for seed in self.seeds:
                for name, settings in self.variants:
                    cfg = dataclasses.replace(self.base, seed=seed, prune_ratio=ratio, **settings)
                    specs.append(RunSpec("kd", seed, ratio, cfg, name))
            return specs
        for seed in self.seeds:
            for ratio in self.ratios or (None,):
                cfg = dataclasses.replace(self.base, seed=seed, prune_ratio=ratio or 0.0)
                specs.append(RunSpec("kd", seed, ratio, cfg))
        return specs

    def describe(self) -> str:
        """What runs and with which distillation settings, said before and saved with the results."""
        settings = self.settings_text(sources=True)
        ratios = f"teacher prune ratios {', '.join(f'{r:g}' for r in self.ratios)}; " if self.ratios else ""
        if self.variants:
            ratios = f"{len(self.variants) + 1} students (dense baseline first), teacher prune ratio {self.ratios[0]:g}; "
        return (f"{self.table} ({self.base.mode}) on {self.base.dataset}/{self.base.arch}: seeds "
                f"{', '.join(map(str, self.seeds))}; {ratios}{self.base.epochs} epochs per run; {settings}")

"""The structure table of `python -m rekd.reproduce structure`: sparse students against the dense baseline.

One row per student (rekd.evaluate.reproduce_plan.structure_variants): its test accuracy (mean +- std over
seeds), the difference to the dense baseline paired by seed with its 95% Student-t interval (rekd.stats),
and what it costs: conv density, live synapses, SOPs and energy per sample in its last epoch's validation pass
(rekd.snn.energy counts live synapses only). Scores are fractions in the records, percent here.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from rekd.stats import mean_std, paired, paired_ci

LEVEL = 0.95
BASELINE = "dense baseline"
COSTS = ("density", "connections", "sops", "energy_uj")


@dataclass(frozen=True)
class StructureRow:
    name: str
    teacher: str  # "none" (cross-entropy only) or the pruned teacher
    acc: tuple[float, ...]  # per seed, in seed order
    baseline: tuple[float, ...]  # the dense baseline's, same seeds
    costs: dict  # cost -> per-seed values

    def numbers(self) -> dict[str, float]:
        out = dict(zip(("acc_mean", "acc_std"), (100 * v for v in mean_std(self.acc))))
        if self.name != BASELINE:
            gain, low, high = paired_ci(self.acc, self.baseline, LEVEL)
            out.update(delta_mean=100 * gain, delta_std=100 * paired(self.acc, self.baseline)[1],
                       delta_ci_low=100 * low, delta_ci_high=100 * high)
        for cost, values in self.costs.items():
            out[cost] = mean_std(values)[0]
        return out


def rows(records: Sequence[dict], seeds: Sequence[int], variants: Sequence[tuple[str, dict]],
         prune_ratio: float) -> list[StructureRow]:
    """The dense baseline first, then one row per variant, from the per-run records."""
    def run(kind: str, seed: int, variant: str) -> dict:
        found = [r for r in records if r["kind"] == kind and r["seed"] == seed and r.get("variant", "") == variant]
        if len(found) != 1:
            raise ValueError(f"expected one {kind} run {variant!r} of seed {seed}; found {len(found)}")
        return found[0]

    def row(name: str, teacher: str, runs: list[dict]) -> StructureRow:
        return StructureRow(name, teacher, tuple(r["test_acc"] for r in runs), baseline,
                            {c: tuple(r[c] for r in runs) for c in COSTS})

    base_runs = [run("baseline", s, "") for s in seeds]
    baseline = tuple(r["test_acc"] for r in base_runs)
    out = [row(BASELINE, "none", base_runs)]
    for name, settings in variants:
        teacher = f"baseline pruned at {prune_ratio:g}" if settings.get("mode") == "sparse_kd" else "none"
        if settings.get("generations", 1) > 1:
            teacher += ", then the previous generation pruned"
        out.append(row(name, teacher, [run("kd", s, name) for s in seeds]))
    return out


def markdown(table: Sequence[StructureRow], caption: str) -> str:
    head = ["Student", "Teacher", "Conv density (%)", "Connections", "Test acc. (%)", "Δ vs dense baseline (%)",
            f"{LEVEL:.0%} CI of Δ (%)", "SOPs / sample", "Energy (µJ / sample)"]
    lines = [caption, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in table:
        n = row.numbers()
        delta = (f"{n['delta_mean']:+.2f} ± {n['delta_std']:.2f}", f"[{n['delta_ci_low']:+.2f}, {n['delta_ci_high']:+.2f}]") \
            if "delta_mean" in n else ("—", "—")
        lines.append("| " + " | ".join([row.name, row.teacher, f"{100 * n['density']:.1f}", f"{n['connections']:,.0f}",
                                       f"{n['acc_mean']:.2f} ± {n['acc_std']:.2f}", *delta, f"{n['sops']:,.0f}",
                                       f"{n['energy_uj']:.3f}"]) + " |")
    return "\n".join(lines)


def csv_text(table: Sequence[StructureRow], dataset: str, arch: str, settings: dict) -> str:
    stats = ["acc_mean", "acc_std", "delta_mean", "delta_std", "delta_ci_low", "delta_ci_high", *COSTS]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["dataset", "arch", "student", "teacher", *stats, "seeds", *settings])
    for row in table:
        n = row.numbers()
        writer.writerow([dataset, arch, row.name, row.teacher, *(f"{n[s]:.6g}" if s in n else "" for s in stats),
                         len(row.acc), *settings.values()])
    return out.getvalue()


def summary_metrics(table: Sequence[StructureRow]) -> dict[str, float]:
    """The table as MLflow metrics of the parent run, one prefix per student (accuracies as fractions)."""
    out = {}
    for row in table:
        # MLflow's metric names allow letters, digits, _ - . / : and spaces
        prefix = row.name.lower().replace(" + kd", "_kd").replace(", ", "/").replace(" ", "_") + "/"
        for key, value in row.numbers().items():
            out[prefix + key] = value / 100 if key.startswith(("acc", "delta")) else value
    return out


def plot(table: Sequence[StructureRow], title: str, path: Path) -> Path:
    """Accuracy against conv density: each student at its mean (std error bars), gmp and rewire as lines over
    sparsity, filled markers where a pruned teacher taught; the dense baseline as a band."""
    import matplotlib

    matplotlib.use("Agg")  # files only
    import matplotlib.pyplot as plt

    numbers = {row.name: row.numbers() for row in table}
    base = numbers[BASELINE]
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    ax.axhspan(base["acc_mean"] - base["acc_std"], base["acc_mean"] + base["acc_std"], color="0.88", zorder=0)
    ax.axhline(base["acc_mean"], color="0.3", linestyle="--", label=f"dense baseline ({base['acc_mean']:.2f} %)")
    # Series at the same densities are set a little apart, so that their error bars stay readable.
    for structure, color, shift in (("gmp", "tab:blue", -0.8), ("rewire", "tab:orange", 0.8)):
        for taught, fill in ((False, "none"), (True, color)):
            group = [row for row in table if row.name.startswith(f"{structure} ") and "generations" not in row.name
                     and row.name.endswith(" + KD") == taught]
            if not group:
                continue
            group.sort(key=lambda row: numbers[row.name]["density"])
            offset = shift + (0.4 if taught else -0.4)
            ax.errorbar([100 * numbers[r.name]["density"] + offset for r in group],
                        [numbers[r.name]["acc_mean"] for r in group],
                        yerr=[numbers[r.name]["acc_std"] for r in group], color=color, marker="o", mfc=fill,
                        capsize=3, linestyle="-" if taught else ":",
                        label=f"{structure}{' + pruned teacher' if taught else ', no teacher'}")
    others = [row for row in table if row.name != BASELINE
              and not (row.name.startswith(("gmp ", "rewire ")) and "generations" not in row.name)]
    for row, color in zip(others, ("tab:green", "tab:purple", "tab:red", "tab:brown", "tab:pink")):
        n = numbers[row.name]
        ax.errorbar([100 * n["density"] + 2.0], [n["acc_mean"]], yerr=[n["acc_std"]], marker="s", capsize=3,
                    color=color, linestyle="none", label=row.name)
    ax.set_xlabel("conv density of the student (%)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

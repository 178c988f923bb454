"""The tables of `python -m rekd.reproduce`: per-seed test accuracies -> the paper's layout, as Markdown, CSV,
summary metrics and (Table 1) a plot of accuracy against the teacher's prune ratio.

Per-seed scores are fractions (as MLflow holds them); the Markdown and CSV tables give percent, as the
paper does. Every cell is mean +- std over seeds; the improvement is paired by seed, with its 95%
Student-t confidence interval (rekd.stats).
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from rekd.stats import mean_std, paired, paired_ci

LEVEL = 0.95  # of the improvement's confidence interval


@dataclass(frozen=True)
class Row:
    """One line of a table: the per-seed test accuracies it summarises, in seed order."""
    prune_ratio: Optional[float]  # Table 1's teacher prune ratio; None in Table 2
    student: tuple[float, ...]  # the baseline student (cross-entropy only)
    kd: tuple[float, ...]  # the student distilled from this row's teacher
    teacher: tuple[float, ...] = ()  # Table 1: the pruned teacher, no fine-tuning
    teacher_sparsity: tuple[float, ...] = ()  # Table 1: share of conv weights that are zero

    def numbers(self) -> dict[str, float]:
        """Means, stds and the paired improvement with its interval, in percent."""
        out = {}
        for name, values in (("teacher_acc", self.teacher), ("student_acc", self.student), ("kd_acc", self.kd)):
            if values:
                out[f"{name}_mean"], out[f"{name}_std"] = (100 * v for v in mean_std(values))
        gain, low, high = paired_ci(self.kd, self.student, LEVEL)
        out.update(improvement_mean=100 * gain, improvement_std=100 * paired(self.kd, self.student)[1],
                   improvement_ci_low=100 * low, improvement_ci_high=100 * high)
        if self.teacher_sparsity:
            out["teacher_sparsity"] = 100 * mean_std(self.teacher_sparsity)[0]
        return out


def rows_from(records: Sequence[dict], seeds: Sequence[int], ratios: Sequence[float]) -> list[Row]:
    """Rows from the per-run records ({kind, seed, prune_ratio, test_acc, teacher_test_acc...}).

    Table 1 has one row per prune ratio (ratios given); Table 2 one row (ratios empty).
    """
    def score(kind: str, seed: int, ratio: Optional[float], key: str = "test_acc") -> float:
        found = [r[key] for r in records if r["kind"] == kind and r["seed"] == seed and r.get("prune_ratio") == ratio]
        if len(found) != 1:
            raise ValueError(f"expected one {kind} run of seed {seed}, prune ratio {ratio}; found {len(found)}")
        return found[0]

    student = tuple(score("baseline", s, None) for s in seeds)
    if not ratios:
        return [Row(None, student, tuple(score("kd", s, None) for s in seeds))]
    return [Row(r, student, tuple(score("kd", s, r) for s in seeds),
                teacher=tuple(score("kd", s, r, "teacher_test_acc") for s in seeds),
                teacher_sparsity=tuple(score("kd", s, r, "teacher_sparsity") for s in seeds)) for r in ratios]


def _pm(mean: float, std: float, signed: bool = False) -> str:
    return f"{mean:+.2f} ± {std:.2f}" if signed else f"{mean:.2f} ± {std:.2f}"


def markdown(rows: Sequence[Row], dataset: str, arch: str, caption: str) -> str:
    """The paper's layout (Table 1 with a prune-ratio column when rows carry one), plus the 95% CI."""
    table1 = rows[0].prune_ratio is not None
    head = ["Dataset", "SNN model"] + (["Teacher prune ratio", "Teacher acc. (%)"] if table1 else []) + [
        "Student SNN acc. (%)", "Student KD acc. (%)", "Improvement (%)", f"{LEVEL:.0%} CI of the improvement (%)"]
    lines = [caption, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        n = row.numbers()
        cells = [dataset, arch]
        if table1:
            cells += [f"{row.prune_ratio:g}", _pm(n["teacher_acc_mean"], n["teacher_acc_std"])]
        cells += [_pm(n["student_acc_mean"], n["student_acc_std"]), _pm(n["kd_acc_mean"], n["kd_acc_std"]),
                  _pm(n["improvement_mean"], n["improvement_std"], signed=True),
                  f"[{n['improvement_ci_low']:+.2f}, {n['improvement_ci_high']:+.2f}]"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def csv_text(rows: Sequence[Row], dataset: str, arch: str, settings: dict) -> str:
    """One line per row: every mean, std and interval bound in percent, and the distillation settings."""
    table1 = rows[0].prune_ratio is not None
    stats = (["teacher_sparsity", "teacher_acc_mean", "teacher_acc_std"] if table1 else []) + [
        "student_acc_mean", "student_acc_std", "kd_acc_mean", "kd_acc_std", "improvement_mean", "improvement_std",
        "improvement_ci_low", "improvement_ci_high"]
    head = ["dataset", "arch"] + (["prune_ratio"] if table1 else []) + [f"{s}_pct" for s in stats] + [
        "seeds", *settings]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(head)
    for row in rows:
        n = row.numbers()
        writer.writerow([dataset, arch] + ([f"{row.prune_ratio:g}"] if table1 else [])
                        + [f"{n[s]:.4f}" for s in stats] + [len(row.kd), *settings.values()])
    return out.getvalue()


def summary_metrics(rows: Sequence[Row]) -> dict[str, float]:
    """The table as MLflow metrics of the parent run (fractions, like the children's test_acc)."""
    out = {}
    for row in rows:
        prefix = "" if row.prune_ratio is None else f"prune_{row.prune_ratio:g}/"
        out.update({prefix + k: v / 100 for k, v in row.numbers().items()})
    return out


def plot(rows: Sequence[Row], title: str, path: Path) -> Path:
    """Table 1 as a figure: teacher and KD student against the prune ratio (mean, std error bars), and the
    baseline student as a horizontal line with its std band."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers or in Ray jobs
    import matplotlib.pyplot as plt

    ratios = [r.prune_ratio for r in rows]
    numbers = [r.numbers() for r in rows]
    base_mean, base_std = numbers[0]["student_acc_mean"], numbers[0]["student_acc_std"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.axhspan(base_mean - base_std, base_mean + base_std, color="0.85", zorder=0)
    ax.axhline(base_mean, color="0.3", linestyle="--", label=f"baseline student ({base_mean:.2f} %)")
    for key, label, marker in (("teacher_acc", "pruned teacher (no fine-tuning)", "s"),
                               ("kd_acc", "KD student", "o")):
        ax.errorbar(ratios, [n[f"{key}_mean"] for n in numbers], yerr=[n[f"{key}_std"] for n in numbers],
                    marker=marker, capsize=4, label=label)
    ax.set_xlabel("teacher prune ratio")
    ax.set_ylabel("test accuracy (%)")
    ax.set_xticks(ratios)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

"""`python -m rekd.evaluate.compare A B`: two reproductions of one table side by side, e.g. untuned against tuned.

A and B are folders written by `python -m rekd.reproduce` (their runs.json and plan.json), of the same table,
dataset and architecture, with seeds in common. For each row both have (table1: each teacher prune ratio both
ran), it gives each reproduction's improvement over its baseline with its 95% interval, as the tables do, and
the difference of the two KD students, B - A, paired by seed, with its interval: did B's settings change the
verdict? Runs of one seed share the validation split, and the baselines of one seed are the same training run
configuration in both (on one machine they are the same network to the last bit: the output says whether
they are).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from rekd.cli import Parser, run
from rekd.errors import UsageError
from rekd.evaluate.tables import LEVEL, rows_from
from rekd.stats import paired_ci

PROG = "python -m rekd.evaluate.compare"


def build_parser() -> Parser:
    p = Parser(prog=PROG, description="Compare two reproductions of one table (e.g. untuned and tuned settings), "
                                      "paired by seed.")
    p.add_argument("a", metavar="A", help="a folder written by python -m rekd.reproduce (the reference)")
    p.add_argument("b", metavar="B", help="another reproduction of the same table, dataset and architecture")
    p.add_argument("--names", default="A,B", metavar="NAME,NAME", help="what to call them (default A,B)")
    return p


def load(folder: str) -> dict:
    """A reproduction's plan and runs; a folder that is not one is the user's error."""
    path = Path(folder).expanduser()
    try:
        plan = json.loads((path / "plan.json").read_text())
        runs = json.loads((path / "runs.json").read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"{folder} is not a finished reproduction ({e.__class__.__name__}: plan.json and runs.json "
                         "are needed); allowed: a folder written by python -m rekd.reproduce") from None
    if plan.get("table") not in ("table1", "table2"):
        raise UsageError(f"{folder} holds the {plan.get('table')} table; allowed: table1 or table2")
    return {"plan": plan, "runs": runs["runs"], "base": plan["runs"][0]["config"]}


def check_comparable(a: dict, b: dict, names: Sequence[str]) -> None:
    if a["plan"]["table"] != b["plan"]["table"]:
        raise UsageError(f"{names[0]} is {a['plan']['table']} and {names[1]} is {b['plan']['table']}; allowed: "
                         "two reproductions of the same table")
    for key in ("dataset", "arch", "epochs"):
        if a["base"][key] != b["base"][key]:
            raise UsageError(f"{names[0]} has {key}={a['base'][key]} and {names[1]} {key}={b['base'][key]}; allowed: "
                             f"the same {key} (their baselines must be comparable)")


def compare(a: dict, b: dict) -> list[dict]:
    """One line per row both reproductions have: each one's improvement and B's KD minus A's KD, paired by seed."""
    seeds = sorted(set(a["plan"]["seeds"]) & set(b["plan"]["seeds"]))
    if len(seeds) < 2:
        raise UsageError(f"the reproductions share {len(seeds)} seed(s); allowed: at least 2 in common (an interval "
                         "over per-seed differences)")
    ratios = [r for r in a["plan"]["prune_ratios"] if r in b["plan"]["prune_ratios"]]
    if a["plan"]["table"] == "table1" and not ratios:
        raise UsageError("the reproductions share no teacher prune ratio; allowed: table1s with a ratio in common")
    rows_a, rows_b = rows_from(a["runs"], seeds, ratios), rows_from(b["runs"], seeds, ratios)
    lines = []
    for row_a, row_b in zip(rows_a, rows_b):
        na, nb = row_a.numbers(), row_b.numbers()
        diff, low, high = paired_ci(row_b.kd, row_a.kd, LEVEL)
        lines.append({"prune_ratio": row_a.prune_ratio, "seeds": len(seeds),
                      "same_baselines": row_a.student == row_b.student,
                      "a_student": na["student_acc_mean"], "b_student": nb["student_acc_mean"],
                      "a_kd": na["kd_acc_mean"], "b_kd": nb["kd_acc_mean"],
                      "a_gain": (na["improvement_mean"], na["improvement_ci_low"], na["improvement_ci_high"]),
                      "b_gain": (nb["improvement_mean"], nb["improvement_ci_low"], nb["improvement_ci_high"]),
                      "b_minus_a": (100 * diff, 100 * low, 100 * high)})
    return lines


def markdown(lines: list[dict], a: dict, b: dict, names: Sequence[str]) -> str:
    base, na, nb = a["base"], names[0], names[1]
    table1 = lines[0]["prune_ratio"] is not None
    head = (["Teacher prune ratio"] if table1 else []) + [
        "Student SNN acc. (%)" + ("" if same_all(lines) else f" ({na} / {nb})"), f"{na}: KD acc. (%)", f"{na}: improvement [95% CI]", f"{nb}: KD acc. (%)", f"{nb}: improvement [95% CI]",
        f"{nb} − {na} (KD students) [95% CI]"]
    same = same_all(lines)
    out = [f"{a['plan']['table']} on {base['dataset']}/{base['arch']}, {base['epochs']} epochs, {lines[0]['seeds']} "
           f"seeds in common; test accuracy; intervals are Student t over per-seed differences. Baselines "
           + ("identical in both, seed by seed." if same else "differ between the two (other settings or machine)."),
           "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for line in lines:
        student = f"{line['a_student']:.2f}" + ("" if same else f" / {line['b_student']:.2f}")
        cells = ([f"{line['prune_ratio']:g}"] if table1 else []) + [
            student, f"{line['a_kd']:.2f}", interval(line["a_gain"]), f"{line['b_kd']:.2f}", interval(line["b_gain"]),
            interval(line["b_minus_a"])]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def same_all(lines: list[dict]) -> bool:
    return all(line["same_baselines"] for line in lines)


def interval(values: tuple[float, float, float]) -> str:
    mean, low, high = values
    return f"{mean:+.2f} [{low:+.2f}, {high:+.2f}]"


def _main(argv: Optional[Sequence[str]]) -> int:
    args = build_parser().parse_args(argv)
    names = [n.strip() for n in args.names.split(",")]
    if len(names) != 2 or not all(names):
        raise UsageError(f"--names {args.names} is not allowed; allowed: two names, e.g. untuned,tuned")
    a, b = load(args.a), load(args.b)
    check_comparable(a, b, names)
    print(markdown(compare(a, b), a, b, names), end="")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run(_main, PROG, argv)


if __name__ == "__main__":
    sys.exit(main())

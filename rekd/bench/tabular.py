"""`python -m rekd.bench.tabular`: the tabular benchmark of rekd's search (rekd.bench.table, rekd.bench.replay).

    build    train the table's runs as Ray tasks (resumable) and write the table
    compare  replay every search strategy over a table with many seeds: regret, budget to target, ranks
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence

from rekd.cli import Parser, run

PROG = "python -m rekd.bench.tabular"


def build_parser() -> Parser:
    from rekd.bench.table import DEFAULT_CONFIGS

    p = Parser(prog=PROG, description="The tabular benchmark of rekd's search strategies on real learning curves.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    b = sub.add_parser("build", help="train a table's runs (Ray tasks, resumable) and write the table")
    b.add_argument("--dataset", default="digits", help="an embedded dataset (default digits)")
    b.add_argument("--configs", type=int, help="configurations per mode (default: "
                   + ", ".join(f"{k} {v}" for k, v in DEFAULT_CONFIGS.items()) + ")")
    b.add_argument("--seeds", type=int, default=2, help="seeds per configuration (default 2)")
    b.add_argument("--epochs", type=int, default=8, help="the full epoch budget of every run (default 8)")
    b.add_argument("--arch", default="tiny")
    b.add_argument("--val-fraction", type=float, default=0.1,
                   help="share of the training split held out for validation (default 0.1, rekd's)")
    b.add_argument("--work-dir", help="where the runs are recorded as they finish (default "
                   "rekd-results/tabular-DATASET); the same command continues a killed build")
    b.add_argument("--out", help="the table (default WORK_DIR/DATASET.csv.gz)")

    c = sub.add_parser("compare", help="replay the search strategies over a table")
    c.add_argument("--table", default="digits", help="a shipped table (digits, ndigits, digits-val30) or a .csv.gz file")
    c.add_argument("--mode", choices=("sparse_kd", "default_kd"), action="append",
                   help="the modes to search (repeatable; default both)")
    c.add_argument("--seeds", type=int, default=20, help="searches per strategy (default 20)")
    c.add_argument("--budget", type=int, help="epochs per search (default 16 full-budget trials' worth)")
    c.add_argument("--target", type=float, default=0.5,
                   help="the target regret in points of test accuracy (default 0.5)")
    c.add_argument("--strategy", action="append", help="only these strategies (repeatable; default all)")
    c.add_argument("--against", metavar="STRATEGY",
                   help="also pair every strategy by seed with this one (as the default was chosen), not only random")
    c.add_argument("--plot", help="also plot regret against epochs spent to this PNG")
    c.add_argument("--markdown", help="also write the comparison as a Markdown table to this file")
    c.add_argument("--workers", type=int, default=0, help="processes replaying searches (default: one per CPU)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run(_main, PROG, argv)


def _main(argv: Optional[Sequence[str]]) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "build":
        from rekd.bench.table import DEFAULT_CONFIGS, Design, build

        configs = args.configs if args.configs is not None else DEFAULT_CONFIGS.get(args.dataset, 48)
        design = Design(dataset=args.dataset, configs=configs, seeds=args.seeds, epochs=args.epochs,
                        arch=args.arch, val_fraction=args.val_fraction).check()
        from rekd.bench.table import BuildInterrupted

        work = Path(args.work_dir or f"rekd-results/tabular-{args.dataset}")
        try:
            build(design, work, Path(args.out) if args.out else work / f"{args.dataset}.csv.gz",
                  progress=lambda line: print(line, flush=True))
        except BuildInterrupted as e:
            return e.exit_status
        return 0
    from rekd.bench.search_quality import compare_command
    return compare_command(args)


if __name__ == "__main__":
    sys.exit(main())

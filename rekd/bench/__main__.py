"""`python -m rekd.bench`: the cost of every layer of rekd, measured side by side as ratios (rekd.bench.rows).

Absolute times on shared machines are noise; ratios of two things measured in the same run are not.
Groups: snn, compile, kd, data, harness (rekd.bench.cpu), search (rekd.bench.search_efficiency), pareto
(rekd.bench.pareto_efficiency), tabular (rekd.bench.search_quality, on the shipped digits table), gpu
(rekd.bench.gpu, only where CUDA is present).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from rekd.bench.rows import Row, print_table
from rekd.cli import Parser, run

PROG = "python -m rekd.bench"


def build_parser() -> Parser:
    p = Parser(prog=PROG, description="Measure rekd's costs as ratios and compare them with their targets.")
    p.add_argument("--quick", action="store_true", help="a reduced set in a few minutes")
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    p.add_argument("--only", choices=("snn", "compile", "kd", "data", "harness", "search", "pareto", "tabular", "gpu"),
                   action="append", help="run only these groups (repeatable); gpu runs only where CUDA is present")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run(_main, PROG, argv)


def _main(argv: Optional[Sequence[str]]) -> int:
    # Each group imports what it needs when it runs: a lent GPU machine has torch but not Ray, Optuna or
    # MLflow, and `--only gpu` must run there.
    args = build_parser().parse_args(argv)
    groups = args.only or ["snn", "compile", "kd", "data", "harness", "search", "pareto", "tabular", "gpu"]
    rows: list[Row] = []
    if {"snn", "compile", "kd", "data", "harness"} & set(groups):
        from rekd.bench.cpu import compile_row, data_rows, distillation_overhead, harness_overhead, snn_vs_ann
    if "snn" in groups:
        rows += [snn_vs_ann("tiny", args.quick), snn_vs_ann("resnet18", args.quick)]
    if "compile" in groups:
        rows += [compile_row("tiny", args.quick), compile_row("resnet18", args.quick)]
    if "kd" in groups:
        rows += distillation_overhead(args.quick)
    if "data" in groups:
        rows += data_rows(args.quick)
    if "harness" in groups:
        # All cores busy with trials (Ray's own processes compete with them), and one core left to Ray.
        rows += [harness_overhead(args.quick, concurrency) for concurrency in (os.cpu_count() or 1, 1)]
    if "search" in groups:
        from rekd.bench.search_efficiency import search_efficiency
        rows += search_efficiency(args.quick)
    if "pareto" in groups:
        from rekd.bench.pareto_efficiency import pareto_efficiency
        rows += pareto_efficiency(args.quick)
    if "tabular" in groups:
        from rekd.bench.search_quality import tabular_rows
        rows += tabular_rows(args.quick)
    if "gpu" in groups and torch.cuda.is_available():
        from rekd.bench.gpu import gpu_rows
        rows += gpu_rows(args.quick)
    elif "gpu" in groups:
        print("no GPU here: the GPU measurements (bf16, torch.compile, channels_last, IF implementations, "
              "trials sharing a GPU) were not run", file=sys.stderr)
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps([r.as_dict() for r in rows], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

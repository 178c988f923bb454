"""A measurement of `python -m rekd.bench` (a row: value, unit, target), the timers that make them, the table."""
from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable, Optional


@dataclasses.dataclass
class Row:
    name: str
    value: float
    unit: str
    target: Optional[float]  # upper bound unless `higher_is_better`
    detail: str = ""
    higher_is_better: bool = False

    @property
    def meets_target(self) -> Optional[bool]:
        if self.target is None:
            return None
        return self.value >= self.target if self.higher_is_better else self.value <= self.target

    def as_dict(self) -> dict:
        return {"name": self.name, "value": self.value, "unit": self.unit, "target": self.target,
                "meets_target": self.meets_target, "detail": self.detail}


def median_time(fn: Callable[[], None], warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_median_times(fns: dict[str, Callable[[], None]], warmup: int, repeats: int) -> dict[str, float]:
    """Median time of each function, timed in turn round after round, so that a machine that slows down
    or speeds up during the measurement moves all of them alike and their ratios stay fair."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def print_table(rows: list[Row]) -> None:
    if not rows:
        print("nothing measured")
        return
    width = max(len(r.name) for r in rows)
    print(f"{'measurement':<{width}}  {'value':>8}  {'target':>8}  ok   detail")
    for r in rows:
        target = "" if r.target is None else (">= " if r.higher_is_better else "<= ") + f"{r.target:g}"
        ok = {True: "yes", False: "NO", None: "-"}[r.meets_target]
        print(f"{r.name:<{width}}  {r.value:>8.3f}  {target:>8}  {ok:<4} {r.detail}")

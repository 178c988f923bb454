"""Pareto fronts of several objectives: dominance, non-dominated sorting, crowding distance, hypervolume.

Pure functions over points that are already in minimisation form (`minimised` turns a maximised
objective into its negative), so that "smaller is better" in every coordinate. Used by MO-ASHA at each
rung (rekd.search.moasha), by the search's summary and `rekd.best --pareto` (the front a search found),
by `rekd.final` (which points stay non-dominated once seeds are averaged) and by the benchmark.

A point with a NaN coordinate is worse than every finite point: it goes in a front of its own, last.
"""
from __future__ import annotations

import math
from typing import Sequence

Point = tuple[float, ...]


def minimised(values: Sequence[float], modes: Sequence[str]) -> Point:
    """Objective values as a point to minimise: a `max` objective is negated."""
    if len(values) != len(modes):
        raise ValueError(f"{len(values)} values for {len(modes)} objectives")
    out = []
    for value, mode in zip(values, modes):
        if mode not in ("min", "max"):
            raise ValueError(f"mode {mode!r}; allowed: min, max")
        value = float(value)
        out.append(-value if mode == "max" else value)
    return tuple(out)


def finite(point: Sequence[float]) -> bool:
    return all(math.isfinite(v) for v in point)


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """a is no worse than b in every objective and better in at least one (both minimised)."""
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def nondominated_sort(points: Sequence[Sequence[float]]) -> list[list[int]]:
    """Indices of `points` in successive fronts: the first front is the non-dominated points, the second
    those dominated only by the first, and so on (Deb et al. 2002). Points with a NaN coordinate form the
    last front. Each front lists its indices in ascending order."""
    good = [i for i, p in enumerate(points) if finite(p)]
    bad = [i for i, p in enumerate(points) if not finite(p)]
    dominated_by = {i: 0 for i in good}  # how many points dominate i
    dominating = {i: [] for i in good}  # the points i dominates
    for n, i in enumerate(good):
        for j in good[n + 1:]:
            if dominates(points[i], points[j]):
                dominating[i].append(j)
                dominated_by[j] += 1
            elif dominates(points[j], points[i]):
                dominating[j].append(i)
                dominated_by[i] += 1
    fronts, current = [], [i for i in good if dominated_by[i] == 0]
    while current:
        fronts.append(sorted(current))
        following = []
        for i in current:
            for j in dominating[i]:
                dominated_by[j] -= 1
                if dominated_by[j] == 0:
                    following.append(j)
        current = following
    if bad:
        fronts.append(bad)
    return fronts


def pareto_front(points: Sequence[Sequence[float]]) -> list[int]:
    """Indices of the non-dominated finite points (empty when no point is finite)."""
    fronts = nondominated_sort(points)
    return fronts[0] if fronts and finite(points[fronts[0][0]]) else []


def crowding_distance(points: Sequence[Sequence[float]], front: Sequence[int]) -> dict[int, float]:
    """NSGA-II's crowding distance of each point of one front: the sum over objectives of the gap between
    its two neighbours along that objective, divided by the front's range in it; the extremes of an
    objective get infinity. An objective in which the front has no range adds nothing, and equal points
    get equal distances (so that neither is preferred to its copy)."""
    unique = sorted({tuple(points[i]) for i in front})
    distance = {p: 0.0 for p in unique}
    for m in range(len(unique[0]) if unique else 0):
        ordered = sorted(unique, key=lambda p: p[m])
        low, high = ordered[0][m], ordered[-1][m]
        if not high > low:  # no range (or not finite): this objective tells the points apart nowhere
            continue
        distance[ordered[0]] = distance[ordered[-1]] = math.inf
        for before, point, after in zip(ordered, ordered[1:], ordered[2:]):
            distance[point] += (after[m] - before[m]) / (high - low)
    return {i: distance[tuple(points[i])] for i in front}


def priority(points: Sequence[Sequence[float]]) -> list[tuple[int, float]]:
    """Each point's (front number, -crowding distance): smaller is better. Points with equal priorities
    are equally good; nothing here prefers one of them."""
    out: list[tuple[int, float]] = [(0, 0.0)] * len(points)
    for number, front in enumerate(nondominated_sort(points)):
        crowding = crowding_distance(points, front) if finite(points[front[0]]) else {i: 0.0 for i in front}
        for i in front:
            out[i] = (number, -crowding[i])
    return out


def ahead_of(points: Sequence[Sequence[float]], index: int) -> int:
    """How many points rank strictly ahead of points[index] by priority (front, then crowding)."""
    ranks = priority(points)
    return sum(1 for r in ranks if r < ranks[index])


def order(points: Sequence[Sequence[float]]) -> list[int]:
    """All indices, best first: by front, then larger crowding distance, then the smaller index."""
    ranks = priority(points)
    return sorted(range(len(points)), key=lambda i: (ranks[i], i))


def hypervolume(points: Sequence[Sequence[float]], reference: Sequence[float]) -> float:
    """The volume dominated by the points and bounded by the reference point (all minimised). Points not
    strictly better than the reference in every objective add nothing. Exact, by slicing along the last
    objective (fine for the tens of points of a search's front)."""
    inside = [tuple(p) for p in points if finite(p) and all(x < r for x, r in zip(p, reference))]
    return _volume(sorted(set(inside), key=lambda p: p[-1]), tuple(reference))


def _volume(points: list[Point], reference: Point) -> float:
    """points sorted by their last coordinate, all inside the box of `reference`."""
    if not points:
        return 0.0
    if len(reference) == 1:
        return reference[0] - min(p[0] for p in points)
    total = 0.0
    for n, point in enumerate(points):
        upper = points[n + 1][-1] if n + 1 < len(points) else reference[-1]
        if upper > point[-1]:  # the slab between this point's last coordinate and the next one's
            front = [p[:-1] for p in points[:n + 1]]
            total += (upper - point[-1]) * _volume(sorted(front, key=lambda p: p[-1]), reference[:-1])
    return total


def normalized_hypervolume(points: Sequence[Sequence[float]], ideal: Sequence[float],
                           reference: Sequence[float]) -> float:
    """The hypervolume after scaling every objective so that `ideal` is 0 and `reference` is 1: the share
    of the box between them that the points dominate, from 0 to 1, whatever the objectives' units."""
    spans = [r - i for i, r in zip(ideal, reference)]
    if any(not s > 0 for s in spans):
        raise ValueError(f"reference {tuple(reference)} must be worse than ideal {tuple(ideal)} in every objective")
    scaled = [tuple((x - i) / s for x, i, s in zip(p, ideal, spans)) for p in points if finite(p)]
    return hypervolume(scaled, (1.0,) * len(spans))


def bounds(points: Sequence[Sequence[float]], margin: float = 0.1) -> tuple[Point, Point]:
    """(ideal, reference) for normalising the hypervolume of these points: the best value seen in each
    objective, and the worst seen plus `margin` of the range (so that the worst points still count)."""
    good = [p for p in points if finite(p)]
    if not good:
        raise ValueError("no finite point")
    ideal = tuple(min(p[m] for p in good) for m in range(len(good[0])))
    worst = tuple(max(p[m] for p in good) for m in range(len(good[0])))
    reference = tuple(w + margin * (w - i) if w > i else w + max(abs(w), 1.0) * margin for i, w in zip(ideal, worst))
    return ideal, reference
